"""Stable Diffusion 3 / 3.5 family (MMDiT): the same small interface as families.flux.

Flow matching as SD3 trains (diffusers' train_dreambooth_lora_sd3.py): x_t = (1 - s) x0 + s n with the
velocity n - x0 as the target, timestep density and loss weighting from diffusers' training_utils, the
transformer called with timestep = 1000 s. Latents are not packed and there are no position ids; there
is no guidance embedding: sampling uses classifier-free guidance with `sample.guidance` as its scale.
"""

from __future__ import annotations

import torch

from fluxlora.families.flux import (  # noqa: F401  (shared flow-matching math and path handling)
    DTYPES,
    ModelLoadError,
    call_pipeline,
    encode_images,
    loss_weights,
    noisy,
    open_pipeline,
    resolve_path,
    sample_sigmas,
    shift_sigmas,
)

NAME = "sd3"
LORA_COMPONENT = "transformer"
TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_context": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                     "to_add_out"],
    "wide": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}
EXPORT_FORMATS = ("diffusers",)  # kohya/ComfyUI keys are written for FLUX only


def pipeline_class():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline


def load_pipeline(path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
    """StableDiffusion3Pipeline from a local directory or a hub id, transformer quantized if asked."""
    pipe = open_pipeline(pipeline_class(), path, dtype, revision, "SD3")
    from fluxlora.quantize import quantize_transformer

    quantize_transformer(pipe.transformer, quantize, DTYPES[dtype])
    return pipe


def text_encoders(pipe) -> list:
    return [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]


def default_max_sequence_length(path: str) -> int:
    return 256  # StableDiffusion3Pipeline's default T5 length


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (joint CLIP-L/G + T5 embeddings [N, 77 + L, D], pooled CLIP [N, P]) on CPU."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              device=pipe.text_encoder.device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_len)
    return embeds.cpu(), pooled.cpu()


def pack(latents: torch.Tensor) -> torch.Tensor:
    return latents  # SD3 patchifies inside the transformer


def image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(0, device=device, dtype=dtype)  # positions are the transformer's own embedding


def predict(transformer, xt, sigmas, embeds, pooled, img_ids, guidance: float) -> torch.Tensor:
    """Velocity prediction (``img_ids`` and ``guidance`` belong to FLUX and are unused here)."""
    t = (sigmas * 1000.0).to(xt.dtype)
    return transformer(hidden_states=xt, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                       return_dict=False)[0]


def initial_noise(seed: int, channels: int, latent_h: int, latent_w: int) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(1, channels, latent_h, latent_w, generator=g)


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return pipe.transformer.config.in_channels, resolution // f, resolution // f


@torch.no_grad()
def generate_many(pipe, embeds, pooled, neg, seeds: list[int], resolution: int, steps: int,
                  guidance: float, true_cfg: float) -> list:
    """Images for cached prompt embeddings through StableDiffusion3Pipeline; classifier-free guidance at
    scale ``guidance`` against ``neg`` (``true_cfg`` is FLUX's and unused). Noise per seed, CPU generator."""
    c, h, w = latent_shape(pipe, resolution)
    dev, dtype = pipe.transformer.device, pipe.transformer.dtype
    n = len(seeds)
    kwargs = {}
    if guidance > 1.0:
        if neg is None:  # an empty prompt's embedding is the usual unconditional branch
            neg = encode_prompts(pipe, [""], embeds.shape[1] - pipe.tokenizer_max_length)
        kwargs = dict(negative_prompt_embeds=neg[0].expand(n, -1, -1).to(dev, dtype),
                      negative_pooled_prompt_embeds=neg[1].expand(n, -1).to(dev, dtype))
    latents = torch.cat([initial_noise(s, c, h, w) for s in seeds]).to(dev, dtype)
    return call_pipeline(pipe, dev, prompt_embeds=embeds.to(dev, dtype), pooled_prompt_embeds=pooled.to(dev, dtype),
                         latents=latents, height=resolution, width=resolution, num_inference_steps=steps,
                         guidance_scale=guidance, **kwargs)


def generate(pipe, embeds, pooled, neg, seed: int, resolution: int, steps: int, guidance: float,
             true_cfg: float):
    return generate_many(pipe, embeds, pooled, neg, [seed], resolution, steps, guidance, true_cfg)[0]
