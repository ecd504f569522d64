"""Stable Diffusion 3 / 3.5 family (MMDiT) behind the family interface.

Flow matching as SD3 trains (diffusers' train_dreambooth_lora_sd3.py): x_t = (1 - s) x0 + s n with the
velocity n - x0 as the target (families/flow.py), the transformer called with timestep = 1000 s. Latents are
not packed and there are no position ids (the transformer patchifies and embeds positions itself); there is
no guidance embedding: sampling uses classifier-free guidance with ``sample.guidance`` as its scale.
"""

from __future__ import annotations

import torch

from fluxlora.families import flow
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import call_pipeline, encode_images, initial_noise, open_quantized, vae_factor

TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_context": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                     "to_add_out"],
    "wide": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}


class SD3:
    name = "sd3"
    lora_component = "transformer"
    target_presets = TARGET_PRESETS
    sample_sigmas = staticmethod(flow.sample_sigmas)
    noisy = staticmethod(flow.noisy)
    loss_weights = staticmethod(flow.loss_weights)
    encode_images = staticmethod(encode_images)

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
        """The pipeline from a local directory or a hub id, the transformer quantized if asked."""
        return open_quantized(self.pipeline_class(), path, dtype, revision, "SD3", quantize)

    def bind(self, pipe) -> "SD3":
        return self

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]

    def default_max_sequence_length(self) -> int:
        return 256  # StableDiffusion3Pipeline's default T5 length

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond:
        """-> Cond(embeds: joint CLIP-L/G + T5 [N, 77 + L, D], pooled: CLIP [N, P]) on the CPU."""
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  device=pipe.text_encoder.device,
                                                  do_classifier_free_guidance=False, max_sequence_length=max_len)
        return Cond({"embeds": embeds.cpu(), "pooled": pooled.cpu()})

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # SD3 patchifies inside the transformer

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        return text  # positions are the transformer's own; no guidance embedding

    def predict(self, model, x_t, t, cond: Cond) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=(t * 1000.0).to(x_t.dtype), encoder_hidden_states=cond.embeds,
                     pooled_projections=cond.pooled, return_dict=False)[0]

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        f = vae_factor(pipe)
        return pipe.transformer.config.in_channels, resolution // f, resolution // f

    def pixel_multiple(self, pipe) -> int:
        return vae_factor(pipe) * pipe.transformer.config.patch_size

    @torch.no_grad()
    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """Images through StableDiffusion3Pipeline; classifier-free guidance at scale ``guidance`` against
        ``negative`` (an empty prompt when None; ``true_cfg`` is FLUX's and unused)."""
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype = pipe.transformer.device, pipe.transformer.dtype
        n = len(seeds)
        kwargs = {}
        if guidance > 1.0:
            if negative is None:  # an empty prompt's embedding is the usual unconditional branch
                negative = self.encode_prompts(pipe, [""], cond.embeds.shape[1] - pipe.tokenizer_max_length)
            neg = negative.expand(n).to(dev, dtype)
            kwargs = dict(negative_prompt_embeds=neg.embeds, negative_pooled_prompt_embeds=neg.pooled)
        latents = torch.cat([initial_noise(s, c, h, w) for s in seeds]).to(dev, dtype)
        cond = cond.to(dev, dtype)
        return call_pipeline(pipe, dev, prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
                             latents=latents, height=resolution, width=resolution, num_inference_steps=steps,
                             guidance_scale=guidance, **kwargs)


FAMILY = SD3()
