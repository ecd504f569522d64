"""FLUX.1 family: the pipeline, T5 + CLIP prompt conditioning, 2x2-packed latents with (0, row, col)
position ids, the guidance embedding, flow matching (families/flow.py) and sampling through FluxPipeline.

Flow matching as FLUX trains (and diffusers' train_dreambooth_lora_flux.py): x_t = (1 - s) x0 + s n,
the transformer predicts the velocity n - x0.
"""

from __future__ import annotations

import functools

import torch

from fluxlora.families import flow
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import call_pipeline, encode_images, initial_noise, open_quantized, vae_factor

TARGET_PRESETS = {
    # FLUX.1-dev: 19 double blocks x 4 + 38 single blocks x 3 = 190 Linear 3072x3072 layers.
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_context": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                     "to_add_out"],
    "wide": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
             "proj_out"],
}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] (FLUX 2x2 patches)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [h/2 * w/2, 3] of the packed latent tokens."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, dtype)


@functools.lru_cache(maxsize=16)
def _cached_ids(latent_h: int, latent_w: int) -> torch.Tensor:
    """image_ids per latent size, built once: condition() runs every training step (never modified)."""
    return image_ids(latent_h, latent_w)


class Flux:
    name = "flux"
    lora_component = "transformer"
    target_presets = TARGET_PRESETS
    sample_sigmas = staticmethod(flow.sample_sigmas)
    noisy = staticmethod(flow.noisy)
    loss_weights = staticmethod(flow.loss_weights)
    encode_images = staticmethod(encode_images)
    pack = staticmethod(pack)

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def load(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
        """The pipeline from a local directory or a hub id, the transformer quantized if asked."""
        return open_quantized(self.pipeline_class(), path, dtype, revision, "FLUX", quantize)

    def bind(self, pipe) -> "Flux":
        return self  # nothing of the pipeline enters the training math

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def text_encoders(self, pipe) -> list:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def default_max_sequence_length(self) -> int:
        return 512  # T5 tokens of FLUX.1

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond:
        """-> Cond(embeds: T5 [N, L, D], pooled: CLIP [N, P]) on the CPU."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=max_len,
                                               device=pipe.text_encoder.device)
        return Cond({"embeds": embeds.cpu(), "pooled": pooled.cpu()})

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        """Adds the packed tokens' position ids and the guidance value (read only by distilled models)."""
        return text.with_shared(img_ids=_cached_ids(*latent_hw), guidance=guidance)

    def predict(self, model, x_t, t, cond: Cond) -> torch.Tensor:
        """Velocity prediction. The guidance embedding is fed only to guidance-distilled models."""
        b = x_t.shape[0]
        g = None
        if model.config.guidance_embeds:
            g = torch.full((b,), cond.guidance, device=x_t.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        return model(hidden_states=x_t, timestep=t.to(x_t.dtype), guidance=g, pooled_projections=cond.pooled,
                     encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=cond.img_ids,
                     return_dict=False)[0]

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        f = vae_factor(pipe)
        return pipe.transformer.config.in_channels // 4, resolution // f, resolution // f

    def pixel_multiple(self, pipe) -> int:
        return vae_factor(pipe) * 2  # 2x2 latent patches (pack)

    @torch.no_grad()
    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """Images through FluxPipeline; true classifier-free guidance against ``negative`` when true_cfg > 1.
        Each image's noise comes from its own seeded CPU generator, so batching does not change it."""
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype = pipe.transformer.device, pipe.transformer.dtype
        n = len(seeds)
        kwargs = {}
        if true_cfg > 1.0 and negative is not None:
            neg = negative.expand(n).to(dev, dtype)
            kwargs = dict(negative_prompt_embeds=neg.embeds, negative_pooled_prompt_embeds=neg.pooled,
                          true_cfg_scale=true_cfg)
        latents = torch.cat([pack(initial_noise(s, c, h, w)) for s in seeds]).to(dev, dtype)
        cond = cond.to(dev, dtype)
        return call_pipeline(pipe, dev, prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled,
                             latents=latents, height=resolution, width=resolution, num_inference_steps=steps,
                             guidance_scale=guidance, **kwargs)


FAMILY = Flux()
