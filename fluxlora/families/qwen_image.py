"""Qwen-Image (diffusers' QwenImagePipeline) behind the family interface.

What the pipeline does and this module repeats for training:
- text: the pipeline's own ``encode_prompt`` (its system-prompt chat template, the last hidden state of
  Qwen2.5-VL, the template's first ``prompt_template_encode_start_idx`` tokens dropped). Each caption has its
  own length; the `Cond` holds them zero-padded to ``max_len`` (so conditionings of one run concatenate) with
  a ``mask`` of the real tokens. ``predict`` cuts a batch to its longest caption and hands the transformer the
  embeddings with ``encoder_hidden_states_mask`` (None when nothing is padded), exactly what the pipeline
  passes for that batch: the mask keeps padding out of the joint attention and the text RoPE positions of
  real tokens do not depend on the padding;
- latents: the Wan-style VAE takes a frame axis: pixels [B, 3, 1, H, W] -> posterior mode [B, z, 1, h, w],
  normalised per channel with the VAE's ``latents_mean`` / ``latents_std`` as ``_encode_vae_image`` of the
  image-to-image pipeline does (and the text-to-image pipeline undoes before decoding); stored without the
  frame axis [B, z, h, w]; packed into 2x2-patch tokens [B, h w / 4, 4 z] by the pipeline's ``_pack_latents``.
  The transformer reads the token grid from ``img_shapes`` [(1, h / 2, w / 2)] per image;
- time: the pipeline's scheduler timesteps are 1000 sigma and the transformer gets ``timestep / 1000``: the
  sigma itself. It predicts the velocity noise - x0 (flow matching, families/flow.py). Sampling uses a dynamic
  (resolution-dependent, exponential) shift; training uses the run's ``train.shift`` as the other flow families;
- guidance: Qwen-Image has no guidance embedding (the released configs say ``guidance_embeds: false`` and
  diffusers 0.42's time embedding has no guidance input), so ``predict`` passes ``guidance=None`` and
  ``train.guidance`` is unused. Sampling uses the pipeline's "true CFG" (neg + s (pos - neg), rescaled to the
  conditional prediction's norm) with a negative prompt. As in the other families without a guidance embedding
  (SD3, FLUX.2, Z-Image: ``sample.guidance`` is their classifier-free scale; FLUX.1 needs ``true_cfg`` only
  because its ``guidance`` feeds the embedding), ``sample.guidance`` is ``true_cfg_scale``: on when > 1,
  against ``sample.negative_prompt`` or else " " (Qwen's own examples' negative prompt); ``true_cfg`` is unused.

Main blocks: ``transformer_blocks`` (double stream: the image stream's to_q/k/v/out, the text stream's
add_q/k/v_proj / to_add_out, one MLP and one modulation per stream).
"""

from __future__ import annotations

import torch

from fluxlora.errors import RunError
from fluxlora.families import flow
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import call_pipeline, initial_noise, open_quantized

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
CONTEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
MLP = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
TARGET_PRESETS = {
    # Qwen-Image (20 B): 60 blocks x 4 = 240 Linear 3072x3072 (attn).
    "attn": ATTN,
    "attn_context": ATTN + CONTEXT,
    # The modulations (img_mod.1 / txt_mod.1, 3072 -> 18432, a third of the blocks' weights) stay out.
    "wide": ATTN + CONTEXT + MLP,
}
NEGATIVE = " "  # the negative prompt of Qwen-Image's examples: "even an empty negative prompt like ' '"


def _pipeline_cls():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> 2x2-patch tokens [B, h w / 4, 4C] (the pipeline's _pack_latents)."""
    b, c, h, w = latents.shape
    return _pipeline_cls()._pack_latents(latents, b, c, h, w)


def normalize(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the denoiser's: (z - latents_mean) * (1 / latents_std), as the pipelines write it."""
    shape = (1, vae.config.z_dim) + (1,) * (z.dim() - 2)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    return (z - mean) * inv_std


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> normalised latents [B, z, H/8, W/8] (posterior mode), fp32, CPU."""
    vae = pipe.vae
    z = vae.encode(pixels.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode()  # [B, z, 1, h, w]
    return normalize(vae, z).squeeze(2).float().cpu()


def padded(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> Cond:
    """The pipeline's batch (embeds [N, L, D] padded to the longest caption, mask [N, L] or None when none
    is padded) -> Cond(embeds [N, length, D] zero-padded, mask [N, length] bool)."""
    n, size, d = embeds.shape
    real = torch.ones(n, size, dtype=torch.bool) if mask is None else mask.bool().cpu()
    out = embeds.new_zeros(n, length, d)
    keep = torch.zeros(n, length, dtype=torch.bool)
    out[:, :size], keep[:, :size] = embeds * real[..., None].to(embeds), real
    return Cond({"embeds": out.cpu(), "mask": keep})


def trimmed(cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds, mask) cut to the longest caption of the rows, the mask None when no row is padded: the
    arguments the pipeline hands the transformer for the same captions."""
    length = int(cond.mask.sum(1).max())
    embeds, mask = cond.embeds[:, :length], cond.mask[:, :length]
    return embeds, (None if bool(mask.all()) else mask)


def check_steps(pipe, steps: int) -> None:
    """Qwen-Image's scheduler stretches its sigmas to end at ``shift_terminal`` (0.02): with one step the
    pipeline's schedule is [1.0] and that stretch divides 0 by 0, every image NaN. Refuse it."""
    if steps < 2 and pipe.scheduler.config.get("shift_terminal"):
        terminal = pipe.scheduler.config.shift_terminal
        raise RunError(f"sample.steps {steps}: Qwen-Image's scheduler (shift_terminal {terminal}) makes a NaN "
                       "image in one step -> fix: sample.steps >= 2")


class QwenImage:
    name = "qwen_image"
    lora_component = "transformer"
    target_presets = TARGET_PRESETS
    sample_sigmas = staticmethod(flow.sample_sigmas)
    noisy = staticmethod(flow.noisy)
    loss_weights = staticmethod(flow.loss_weights)
    encode_images = staticmethod(encode_images)
    pack = staticmethod(pack)

    def pipeline_class(self):
        return _pipeline_cls()

    def load(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
        """The pipeline from a local directory or a hub id, the blocks' Linear layers quantized if asked."""
        return open_quantized(self.pipeline_class(), path, dtype, revision, "Qwen-Image", quantize)

    def bind(self, pipe) -> "QwenImage":
        return self  # nothing of the pipeline enters the training math

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list:
        return [pipe.text_encoder]

    def default_max_sequence_length(self) -> int:
        return 512  # QwenImagePipeline.__call__'s default (caption tokens after the dropped template)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond:
        """-> Cond(embeds [N, max_len, D] zero-padded, mask [N, max_len] of the real tokens) on the CPU."""
        embeds, mask = pipe.encode_prompt(prompt=list(prompts), device=pipe.text_encoder.device,
                                          max_sequence_length=max_len)
        return padded(embeds, mask, max_len)

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        """Adds the token grid of the 2x2-packed latents (``guidance``: no guidance embedding)."""
        return text.with_shared(grid=(latent_hw[0] // 2, latent_hw[1] // 2))

    def predict(self, model, x_t, t, cond: Cond) -> torch.Tensor:
        """Velocity prediction, the transformer called as the pipeline's denoising loop calls it."""
        embeds, mask = trimmed(cond)
        img_shapes = [[(1, *cond.grid)]] * x_t.shape[0]
        return model(hidden_states=x_t, timestep=t.to(x_t.dtype), guidance=None, encoder_hidden_states_mask=mask,
                     encoder_hidden_states=embeds, img_shapes=img_shapes, return_dict=False)[0]

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        f = pipe.vae_scale_factor
        return pipe.vae.config.z_dim, resolution // f, resolution // f

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 latent patches (the pipeline's image_processor factor)

    def _text_kwargs(self, cond: Cond, n: int, dev, dtype, prefix: str = "") -> dict:
        """The pipeline's text arguments; an all-true mask too (its encode_prompt turns that into None)."""
        cond = cond.expand(n) if len(cond) == 1 else cond
        length = int(cond.mask.sum(1).max())
        return {f"{prefix}prompt_embeds": cond.embeds[:, :length].to(dev, dtype),
                f"{prefix}prompt_embeds_mask": cond.mask[:, :length].to(dev)}

    @torch.no_grad()
    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """Images through QwenImagePipeline; true CFG at ``true_cfg_scale = guidance`` (on when > 1) against
        ``negative`` (" " when None; ``true_cfg`` is FLUX.1's and unused). Each image's noise comes from its
        own seeded CPU generator (the pipeline's own draw for that seed), so batching does not change it."""
        check_steps(pipe, steps)
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype = pipe.transformer.device, pipe.transformer.dtype
        n = len(seeds)
        kwargs = self._text_kwargs(cond, n, dev, dtype)
        if guidance > 1.0:
            neg = negative if negative is not None else self.encode_prompts(pipe, [NEGATIVE], cond.embeds.shape[1])
            kwargs.update(self._text_kwargs(neg, n, dev, dtype, "negative_"))
        latents = pack(torch.cat([initial_noise(s, c, h, w) for s in seeds])).to(dev, dtype)
        length = max(v.shape[1] for k, v in kwargs.items() if k.endswith("prompt_embeds"))
        return call_pipeline(pipe, dev, latents=latents, height=resolution, width=resolution,
                             num_inference_steps=steps, true_cfg_scale=guidance if guidance > 1.0 else 1.0,
                             max_sequence_length=length, **kwargs)


FAMILY = QwenImage()
