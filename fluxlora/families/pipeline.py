"""Helpers every family shares: opening a diffusers pipeline, dtypes, VAE encoding, seeded noise, calling
the pipeline for images, and moving its pieces between devices (docs/design.md decision 4)."""

from __future__ import annotations

import contextlib
import os

import torch

from fluxlora.errors import ModelLoadError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def open_pipeline(pipeline_cls, path: str, dtype: str, revision: str | None, label: str, **kwargs):
    """``pipeline_cls.from_pretrained`` on a local directory or a hub id (HF_HUB_OFFLINE honoured), every
    model component frozen in eval mode, progress bars off (our own bar reports progress)."""
    try:
        pipe = pipeline_cls.from_pretrained(path, dtype=DTYPES[dtype], revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: only cached models load)" if offline else ""
        raise ModelLoadError(f"could not load {label} pipeline {path!r}{hint}: {e}") from e
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def open_quantized(pipeline_cls, path: str, dtype: str, revision: str | None, label: str, quantize: str):
    """open_pipeline, then the transformer's block Linear layers swapped for bitsandbytes ones if asked
    (docs/design.md decision 3)."""
    from fluxlora.quantize import quantize_transformer

    pipe = open_pipeline(pipeline_cls, path, dtype, revision, label)
    quantize_transformer(pipe.transformer, quantize, DTYPES[dtype])
    return pipe


def vae_factor(pipe) -> int:
    """Pixels per latent cell of the pipeline's VAE."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> normalized latents (posterior mean - shift) * scale, fp32, CPU."""
    vae = pipe.vae
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    shift = vae.config.get("shift_factor") or 0.0
    return ((mean - shift) * vae.config.scaling_factor).float().cpu()


def initial_noise(seed: int, channels: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """Sampling noise [1, C, h, w] from a CPU generator: a seed means the same image on every device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(1, channels, latent_h, latent_w, generator=g)


def call_pipeline(pipe, device, **kwargs) -> list:
    """PIL images from the pipeline. It runs where its first module (the VAE) lives; the VAE waits on the
    CPU during training (docs/design.md decision 4), so it joins the denoiser for sampling and goes back."""
    vae_device = pipe.vae.device
    pipe.vae.to(device)
    try:
        return pipe(output_type="pil", **kwargs).images
    finally:
        pipe.vae.to(vae_device)


@contextlib.contextmanager
def on_device(device: torch.device, *modules):
    """Modules on ``device`` for the block, back on the CPU after it: the big pieces of a pipeline (T5,
    the transformer) never share the accelerator (FLUX.1: T5-XXL ~9.5 GB + an int8 transformer ~12 GB)."""
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


@contextlib.contextmanager
def denoiser_offloaded_for_decode(pipe, denoiser: torch.nn.Module, enabled: bool = True):
    """For one pipeline call: when the VAE starts decoding, the frozen denoiser (with its adapter) moves to
    the CPU, and it returns to its device when the block ends. A pipeline call denoises first and decodes
    last, so nothing needs the denoiser meanwhile; at 1024 px the decoder's activations are several GB."""
    if not enabled:
        yield
        return
    vae = pipe.vae
    home, decode = next(denoiser.parameters()).device, vae.decode

    def offload_then_decode(*args, **kwargs):
        denoiser.to("cpu")
        if home.type == "cuda":
            torch.cuda.empty_cache()
        return decode(*args, **kwargs)

    vae.decode = offload_then_decode  # an instance attribute: the class's method is untouched
    try:
        yield
    finally:
        del vae.decode
        denoiser.to(home)
