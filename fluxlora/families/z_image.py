"""Z-Image / Z-Image-Turbo (diffusers' ZImagePipeline) behind the family interface.

Text: the pipeline's own ``encode_prompt`` (Qwen chat template, the second-to-last hidden state of the Qwen3
model, padding removed). Each prompt's embedding has its own length; the `Cond` holds them padded to
``max_len`` (so conditionings of one run concatenate) with a ``mask`` of the real tokens, and ``predict``
hands the transformer each caption cut to its mask: padding never enters the model.

Latents: FLUX.1's 16-channel VAE, (mean - shift) * scale as the pipeline decodes them, not packed (the
transformer patchifies 2x2 itself). It takes lists, one [C, 1, h, w] latent (a frame axis) per image.

Objective: flow matching as the other flow families (families/flow.py): x_t = (1 - s) x0 + s n with the
velocity n - x0 as the target. Z-Image's transformer is trained in the reverse time: the pipeline feeds it
t = 1 - s (its ``(1000 - timestep) / 1000``) and integrates the *negated* output with the Euler scheduler,
so the model predicts x0 - n. ``predict`` does exactly that and returns the negated output: the velocity
the scheduler steps with, which the shared target matches.

Sampling: ``ZImagePipeline.__call__``. Its guidance is classifier-free with its own scale convention,
pred = pos + g (pos - neg), on when g > 0 (Turbo samples with g = 0, Z-Image with g ~ 4); the negative is
``sample.negative_prompt`` or the empty prompt. There is no guidance embedding (``train.guidance`` unused).

Main blocks: ``layers`` (single stream: image and caption tokens share every projection), and the
``noise_refiner`` (image only) / ``context_refiner`` (caption only) blocks before them.
"""

from __future__ import annotations

import torch

from fluxlora.families import flow
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import call_pipeline, encode_images, initial_noise, open_quantized, vae_factor

ATTN = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
TARGET_PRESETS = {
    # Z-Image (6 B): 30 main layers + 2 noise-refiner + 2 context-refiner blocks x 4 = 136 Linear 3840x3840.
    "attn": ATTN,
    # No separate context stream: caption tokens go through the same projections as the image tokens (and
    # the context refiner's, which the suffixes match too), so attn already adapts the text side.
    "attn_context": ATTN,
    "wide": ATTN + ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"],
}


def captions(cond: Cond) -> list[torch.Tensor]:
    """Each row's caption embedding [L_i, D] without its padding (the pipeline's form)."""
    return [e[m] for e, m in zip(cond.embeds, cond.mask)]


def padded(embeds: list[torch.Tensor], length: int) -> Cond:
    """Variable-length embeddings -> Cond(embeds [N, length, D] zero-padded, mask [N, length] bool)."""
    n, d = len(embeds), embeds[0].shape[-1]
    out = embeds[0].new_zeros(n, length, d)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, e in enumerate(embeds):
        out[i, :len(e)] = e
        mask[i, :len(e)] = True
    return Cond({"embeds": out.cpu(), "mask": mask})


class ZImage:
    name = "z_image"
    lora_component = "transformer"
    target_presets = TARGET_PRESETS
    sample_sigmas = staticmethod(flow.sample_sigmas)
    noisy = staticmethod(flow.noisy)
    loss_weights = staticmethod(flow.loss_weights)
    encode_images = staticmethod(encode_images)

    def pipeline_class(self):
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def load(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
        """The pipeline from a local directory or a hub id, the blocks' Linear layers quantized if asked."""
        return open_quantized(self.pipeline_class(), path, dtype, revision, "Z-Image", quantize)

    def bind(self, pipe) -> "ZImage":
        return self  # nothing of the pipeline enters the training math

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list:
        return [pipe.text_encoder]

    def default_max_sequence_length(self) -> int:
        return 512  # ZImagePipeline's default (chat template included)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond:
        """-> Cond(embeds [N, max_len, D] zero-padded, mask [N, max_len]) on the CPU."""
        # encode_prompt rewrites the list it is given (the chat template): hand it a copy
        embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe.text_encoder.device,
                                       do_classifier_free_guidance=False, max_sequence_length=max_len)
        return padded(embeds, max_len)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # the transformer patchifies

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        return text  # positions are the transformer's own; no guidance embedding

    def predict(self, model, x_t, t, cond: Cond) -> torch.Tensor:
        """The velocity n - x0: the transformer on lists (one latent, one unpadded caption per row) at its
        reversed time 1 - s, negated as the pipeline negates it."""
        x = list(x_t.unsqueeze(2).unbind(0))
        out = model(x, 1.0 - t.float(), captions(cond), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        f = vae_factor(pipe)
        return pipe.transformer.config.in_channels, resolution // f, resolution // f

    def pixel_multiple(self, pipe) -> int:
        return vae_factor(pipe) * pipe.transformer.config.all_patch_size[0]

    def _negative(self, pipe, negative: Cond | None, n: int, max_len: int, dev, dtype) -> list:
        if negative is None:  # the pipeline's own default: the empty prompt
            negative = self.encode_prompts(pipe, [""], max_len)
        return captions(negative.expand(n).to(dev, dtype))

    @torch.no_grad()
    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """Images through ZImagePipeline; classifier-free guidance at its scale ``guidance`` (on when > 0)
        against ``negative`` (the empty prompt when None; ``true_cfg`` is FLUX's and unused). Each image's
        noise comes from its own seeded CPU generator, so batching does not change it."""
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype = pipe.transformer.device, pipe.transformer.dtype
        kwargs = {}
        if guidance > 0:
            kwargs["negative_prompt_embeds"] = self._negative(pipe, negative, len(seeds), cond.embeds.shape[1],
                                                              dev, dtype)
        latents = torch.cat([initial_noise(s, c, h, w) for s in seeds]).to(dev)  # fp32, as the pipeline's
        return call_pipeline(pipe, dev, prompt_embeds=captions(cond.to(dev, dtype)), latents=latents,
                             height=resolution, width=resolution, num_inference_steps=steps,
                             guidance_scale=guidance, **kwargs)


FAMILY = ZImage()
