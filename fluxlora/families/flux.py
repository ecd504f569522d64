"""FLUX.1 family: load the pipeline, encode prompts and images, flow-matching noise/target, predict, sample.

Flow matching as FLUX trains (and diffusers' train_dreambooth_lora_flux.py): x_t = (1 - s) x0 + s n,
the transformer predicts the velocity n - x0, on 2x2-packed latents with (0, row, col) position ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

NAME = "flux"
LORA_COMPONENT = "transformer"  # the pipeline component the adapters belong to (save/load_lora_weights)
EXPORT_FORMATS = ("diffusers", "comfyui")
TARGET_PRESETS = {
    # FLUX.1-dev: 19 double blocks x 4 + 38 single blocks x 3 = 190 Linear 3072x3072 layers.
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_context": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                     "to_add_out"],
    "wide": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
             "proj_out"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(Exception):
    """A user-facing loading problem (path missing, hub unreachable in offline mode, ...)."""


def resolve_path(path: str) -> str:
    """'toy' -> the shipped base model; a local dir stays; anything else must look like a hub id."""
    if path == "toy":
        from fluxlora.toy import base_model_dir

        return str(base_model_dir())
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists():
            raise ModelLoadError(f"model.path {path!r} is a folder but not a diffusers pipeline (no "
                                 "model_index.json) -> fix: point model.path at a pipeline directory")
        return str(p)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model.path {path!r} does not exist -> fix: give a local diffusers pipeline "
                             "directory, a hub id like black-forest-labs/FLUX.1-dev, or 'toy'")
    return path


def open_pipeline(pipeline_cls, path: str, dtype: str, revision: str | None, label: str, **kwargs):
    """``pipeline_cls.from_pretrained`` on a local directory, 'toy' or a hub id (HF_HUB_OFFLINE honoured),
    every model component frozen in eval mode, progress bars off (our own bar reports progress)."""
    try:
        pipe = pipeline_cls.from_pretrained(resolve_path(path), dtype=DTYPES[dtype], revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: only cached models load)" if offline else ""
        raise ModelLoadError(f"could not load {label} pipeline {path!r}{hint}: {e}") from e
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
    """FluxPipeline from a local directory, 'toy' or a hub id, with the transformer quantized if asked."""
    pipe = open_pipeline(pipeline_class(), path, dtype, revision, "FLUX")
    from fluxlora.quantize import quantize_transformer

    quantize_transformer(pipe.transformer, quantize, DTYPES[dtype])
    return pipe


def pipeline_class():
    from diffusers import FluxPipeline

    return FluxPipeline


def text_encoders(pipe) -> list:
    return [pipe.text_encoder, pipe.text_encoder_2]


def default_max_sequence_length(path: str) -> int:
    """The toy model ships its own sampling defaults; real FLUX uses 512 T5 tokens."""
    meta = Path(resolve_path(path)) / "fluxlora_toy.json"
    if meta.exists():
        import json

        return int(json.loads(meta.read_text())["sample"]["max_sequence_length"])
    return 512


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (T5 embeddings [N, L, D], pooled CLIP [N, P]) on CPU."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=max_len,
                                           device=pipe.text_encoder.device)
    return embeds.cpu(), pooled.cpu()


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> normalized latents [B, C, H/f, W/f] (posterior mean)."""
    vae = pipe.vae
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return ((mean - vae.config.shift_factor) * vae.config.scaling_factor).float().cpu()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] (FLUX 2x2 patches)."""
    b, c, h, w = latents.shape
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, dtype)


def sample_sigmas(n: int, scheme: str, generator: torch.Generator, logit_mean: float, logit_std: float,
                  mode_scale: float, shift: float) -> torch.Tensor:
    """Training sigmas in (0, 1): density from diffusers' training_utils, then FLUX's time shift
    s' = shift s / (1 + (shift - 1) s) (the scheduler's static shift)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    name = "none" if scheme == "uniform" else scheme
    u = compute_density_for_timestep_sampling(name, n, logit_mean, logit_std, mode_scale,
                                              generator=generator)
    return shift_sigmas(u.float(), shift)


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow interpolation and its velocity target: (x_t, n - x0)."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3("none" if scheme == "none" else scheme, sigmas)


def predict(transformer, xt, sigmas, embeds, pooled, img_ids, guidance: float) -> torch.Tensor:
    """Velocity prediction. The guidance embedding is fed only to guidance-distilled models."""
    b = xt.shape[0]
    g = None
    if transformer.config.guidance_embeds:
        g = torch.full((b,), guidance, device=xt.device, dtype=torch.float32)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=xt.device, dtype=xt.dtype)
    return transformer(hidden_states=xt, timestep=sigmas.to(xt.dtype), guidance=g,
                       pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]


def initial_noise(seed: int, channels: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """Sampling noise from a CPU generator: a seed means the same image on every device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return pack(torch.randn(1, channels, latent_h, latent_w, generator=g))


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return pipe.transformer.config.in_channels // 4, resolution // f, resolution // f


@torch.no_grad()
def generate_many(pipe, embeds, pooled, neg, seeds: list[int], resolution: int, steps: int,
                  guidance: float, true_cfg: float) -> list:
    """Images (PIL) for a batch of cached prompt embeddings [N, ...], one seed each, through FluxPipeline
    itself. Each image's noise comes from its own seeded CPU generator, so batching does not change it."""
    c, h, w = latent_shape(pipe, resolution)
    dev, dtype = pipe.transformer.device, pipe.transformer.dtype
    n = len(seeds)
    kwargs = {}
    if true_cfg > 1.0 and neg is not None:
        kwargs = dict(negative_prompt_embeds=neg[0].expand(n, -1, -1).to(dev, dtype),
                      negative_pooled_prompt_embeds=neg[1].expand(n, -1).to(dev, dtype), true_cfg_scale=true_cfg)
    latents = torch.cat([initial_noise(s, c, h, w) for s in seeds]).to(dev, dtype)
    return call_pipeline(pipe, dev, prompt_embeds=embeds.to(dev, dtype), pooled_prompt_embeds=pooled.to(dev, dtype),
                         latents=latents, height=resolution, width=resolution, num_inference_steps=steps,
                         guidance_scale=guidance, **kwargs)


def call_pipeline(pipe, device, **kwargs) -> list:
    """PIL images from the pipeline. It runs where its first module (the VAE) lives; the VAE waits on the
    CPU during training (DESIGN decision 4), so it joins the denoiser for sampling and goes back after."""
    vae_device = pipe.vae.device
    pipe.vae.to(device)
    try:
        return pipe(output_type="pil", **kwargs).images
    finally:
        pipe.vae.to(vae_device)


def generate(pipe, embeds, pooled, neg, seed: int, resolution: int, steps: int, guidance: float,
             true_cfg: float):
    """One image (PIL) from cached prompt embeddings [1, ...]."""
    return generate_many(pipe, embeds, pooled, neg, [seed], resolution, steps, guidance, true_cfg)[0]
