"""FLUX.2 [klein] family (Flux2KleinPipeline): Qwen3 prompt conditioning, 2x2-patchified batch-normalised
latents packed into tokens with (t, h, w, l) position ids, flow matching (families/flow.py) and sampling
through the pipeline's own call.

What the pipeline does and this module repeats for training:
- text: the pipeline's ``encode_prompt`` (Qwen3 chat template, hidden states of layers 9, 18, 27 stacked
  along the features); the transformer sees no attention mask, only text ids (0, 0, 0, l);
- latents: VAE posterior mode, 2x2 patchify (C -> 4C at half the size), then the VAE's batch-norm running
  statistics ``(z - mean) / sqrt(var + eps)``: what ``_encode_vae_image`` makes and what the denoising loop
  un-normalises before decoding. Tokens are the patchified grid read row by row (``_pack_latents``);
- time: the transformer gets timestep = sigma (the pipeline passes scheduler t / 1000, sigma = t / 1000) and
  predicts the velocity noise - x0, as FLUX.1;
- guidance: klein has no guidance embedding (the pipeline passes guidance=None); the undistilled models
  sample with classifier-free guidance at ``sample.guidance``, the step-distilled ones (``is_distilled``)
  ignore it.
"""

from __future__ import annotations

import functools

import torch

from fluxlora.families import flow
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import call_pipeline, initial_noise, open_quantized, vae_factor

DOUBLE_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
DOUBLE_CONTEXT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DOUBLE_MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
# Single blocks have only fused layers: q, k, v with the MLP input (to_qkv_mlp_proj, BFL's linear1) and the
# attention output with the MLP output (attn.to_out, a plain Linear there; in double blocks to_out is a
# ModuleList whose Linear is to_out.0). The attention presets take linear1, which carries the single
# blocks' q, k, v (as FLUX.1's presets take their q, k, v); wide also takes linear2.
SINGLE_QKV = ["to_qkv_mlp_proj"]
SINGLE_OUT = ["attn.to_out"]
TARGET_PRESETS = {
    # FLUX.2 [klein] 4B: 5 double blocks x 4 + 20 single blocks x 1 = 40 layers (attn).
    "attn": DOUBLE_ATTN + SINGLE_QKV,
    "attn_context": DOUBLE_ATTN + DOUBLE_CONTEXT + SINGLE_QKV,
    "wide": DOUBLE_ATTN + DOUBLE_CONTEXT + DOUBLE_MLP + SINGLE_QKV + SINGLE_OUT,
}


def _pipeline_cls():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Patchified latents [B, C, H, W] -> tokens [B, H * W, C] (the pipeline's _pack_latents)."""
    return _pipeline_cls()._pack_latents(latents)


@functools.lru_cache(maxsize=16)
def image_ids(grid_h: int, grid_w: int) -> torch.Tensor:
    """Position ids [1, h * w, 4] of the tokens of an h x w patch grid (int64, as the pipeline's)."""
    return _pipeline_cls()._prepare_latent_ids(torch.empty(1, 1, grid_h, grid_w))


@functools.lru_cache(maxsize=16)
def text_ids(length: int) -> torch.Tensor:
    """Position ids [1, L, 4] of L text tokens: (0, 0, 0, l)."""
    return _pipeline_cls()._prepare_text_ids(torch.empty(1, length, 1))


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> patchified, batch-normalised latents [B, 4C, H/2f, W/2f], fp32, CPU."""
    vae = pipe.vae
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    z = _pipeline_cls()._patchify_latents(z).float()
    mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
    return ((z - mean) / std).cpu()


class Flux2:
    name = "flux2"
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
        """The pipeline from a local directory or a hub id, the transformer quantized if asked."""
        return open_quantized(self.pipeline_class(), path, dtype, revision, "FLUX.2", quantize)

    def bind(self, pipe) -> "Flux2":
        return self  # nothing of the pipeline enters the training math

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list:
        return [pipe.text_encoder]

    def default_max_sequence_length(self) -> int:
        return 512  # Flux2KleinPipeline's default

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond:
        """-> Cond(embeds: stacked Qwen3 hidden states [N, L, 3D]) on the CPU. The text ids depend on L
        only (condition / predict build them); the tokenizer's mask is not read by the transformer."""
        embeds, _ = pipe.encode_prompt(prompt=prompts, device=pipe.text_encoder.device, max_sequence_length=max_len)
        return Cond({"embeds": embeds.cpu()})

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        """Adds the tokens' and the text's position ids (``guidance``: klein has no guidance embedding)."""
        return text.with_shared(img_ids=image_ids(*latent_hw), txt_ids=text_ids(text.embeds.shape[1]))

    def predict(self, model, x_t, t, cond: Cond) -> torch.Tensor:
        """Velocity prediction, the transformer called as the pipeline's denoising loop calls it."""
        return model(hidden_states=x_t, timestep=t.to(x_t.dtype), guidance=None, encoder_hidden_states=cond.embeds,
                     txt_ids=cond.txt_ids, img_ids=cond.img_ids, return_dict=False)[0]

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        g = self.pixel_multiple(pipe)
        return pipe.transformer.config.in_channels, resolution // g, resolution // g

    def pixel_multiple(self, pipe) -> int:
        return vae_factor(pipe) * 2  # 2x2 latent patches (the pipeline's vae_scale_factor * 2)

    def _negative(self, pipe, negative: Cond | None, length: int) -> Cond:
        """The unconditional branch: ``negative``, else the empty prompt the pipeline itself would use."""
        return negative if negative is not None else self.encode_prompts(pipe, [""], length)

    @torch.no_grad()
    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """Images through Flux2KleinPipeline; classifier-free guidance at scale ``guidance`` against
        ``negative`` (the empty prompt when None) unless the model is step-distilled (``true_cfg`` is FLUX.1's
        and unused). Each image's noise comes from its own seeded CPU generator."""
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype = pipe.transformer.device, pipe.transformer.dtype
        n = len(seeds)
        kwargs = {}
        if guidance > 1.0 and not pipe.config.is_distilled:
            neg = self._negative(pipe, negative, cond.embeds.shape[1]).expand(n).to(dev, dtype)
            kwargs = dict(negative_prompt_embeds=neg.embeds)
        latents = torch.cat([initial_noise(s, c, h, w) for s in seeds]).to(dev, dtype)  # the pipeline packs
        cond = cond.to(dev, dtype)
        return call_pipeline(pipe, dev, prompt_embeds=cond.embeds, latents=latents, height=resolution,
                             width=resolution, num_inference_steps=steps, guidance_scale=guidance, **kwargs)


FAMILY = Flux2()
