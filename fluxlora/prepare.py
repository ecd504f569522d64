"""Everything computed once before the arms train: the base pipeline, cached latents and text embeddings.

VAE latents are cached once per image (and its mirror when flipping), text embeddings once per unique
caption; afterwards the VAE and text encoders leave the accelerator (DESIGN decision 4).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora import data, metrics
from fluxlora.families import FAMILIES


@dataclass
class Cache:
    latents: torch.Tensor  # [N, V, C, h, w], V = 2 with flip variants else 1
    caption_idx: torch.Tensor  # [N] index into the prompt table


@dataclass
class Prepared:
    family: object
    pipe: object
    device: torch.device
    instance: Cache
    prior: Cache | None
    embeds: torch.Tensor  # [U, L, D] unique captions
    pooled: torch.Tensor  # [U, P]
    sample_prompts: list[str]
    sample_embeds: tuple[torch.Tensor, torch.Tensor]
    negative: tuple[torch.Tensor, torch.Tensor]
    max_len: int
    img_ids: torch.Tensor
    stats: dict = field(default_factory=dict)
    autocast: object = contextlib.nullcontext  # accelerate's mixed-precision context
    evaluator: object = None  # metrics.ToyEvaluator on the toy world, else None
    dtype: torch.dtype = torch.float32  # the transformer's compute dtype
    rank: int = 0  # this process's index in data-parallel training (accelerate launch / torchrun)
    world: int = 1  # number of data-parallel processes

    @property
    def main(self) -> bool:
        """Only the main process writes to the run folder (samples, metrics, checkpoints, exports)."""
        return self.rank == 0


def encode_folder(family, pipe, samples: list[data.Sample], resolution: int, center_crop: bool,
                  flip: bool, seed: int) -> torch.Tensor:
    """Latents [N, V, C, h, w] of prepared images (random crops drawn once, from the seed)."""
    rng = random.Random(seed)
    out = []
    for s in samples:
        pix = data.prepare_image(s.image, resolution, center_crop=center_crop, rng=rng)
        views = torch.stack([pix, data.hflip(pix)]) if flip else pix[None]
        out.append(family.encode_images(pipe, views))
    return torch.stack(out)


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
def denoiser_offloaded_for_decode(pipe, enabled: bool = True):
    """For one pipeline call: when the VAE starts decoding, the frozen denoiser (with its adapter) moves to
    the CPU, and it returns to its device when the block ends. A pipeline call denoises first and decodes
    last, so nothing needs the denoiser meanwhile; at 1024 px the decoder's activations are several GB."""
    if not enabled:
        yield
        return
    denoiser, vae = pipe.transformer, pipe.vae
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


def generate_class_images(family, pipe, folder: Path, embeds, first: int, count: int, resolution: int,
                          steps: int) -> None:
    """Images ``first..count-1`` of the class prompt (cached embeddings) from the base model."""
    for i in range(first, count):
        img = family.generate(pipe, *embeds, None, seed=i, resolution=resolution, steps=steps,
                              guidance=3.5, true_cfg=1.0)
        img.save(folder / f"class_{i:04d}.png")


def class_samples(cfg, family, pipe, device, max_len: int, main_first, warn) -> list[data.Sample]:
    """Prior-preservation images: the class folder, filled up to data.num_class_images by the main
    process (text encoders on the accelerator to encode the class prompt, then the transformer to sample)."""
    d = cfg.data
    if not d.class_prompt:
        return []
    folder = Path(d.class_dir or Path(cfg.output_dir) / cfg.name / "class_images")
    with main_first():
        folder.mkdir(parents=True, exist_ok=True)
        have = len([p for p in folder.iterdir() if p.suffix.lower() in data.IMAGE_EXTS])
        if have < d.num_class_images:
            warn(f"generating {d.num_class_images - have} class images of {d.class_prompt!r} into {folder}")
            with on_device(device, *family.text_encoders(pipe)):
                embeds = family.encode_prompts(pipe, [d.class_prompt], max_len)
            with on_device(device, pipe.transformer):
                generate_class_images(family, pipe, folder, embeds, have, d.num_class_images, d.resolution,
                                      cfg.sample.steps)
    return data.load_samples(folder, d.class_prompt, warn=warn)


def avoid_cudnn_attention(device: torch.device) -> None:
    """Training on CUDA uses the flash / memory-efficient attention kernels, not cuDNN's: on an H100 with
    torch 2.11 + CUDA 13, cuDNN's attention backward hit an illegal memory access on FLUX's joint attention
    (even 2+2 blocks at 512 px); with cuDNN attention off the same steps run (BENCHMARKS.md, GPU section)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def prepare(cfg, device: torch.device, warn=print, main_first=contextlib.nullcontext,
            evaluate: bool = True) -> Prepared:
    """``main_first``: a context in which the main process runs first (class images are generated
    once); ``evaluate``: build the toy evaluator (only the main process logs metrics)."""
    avoid_cudnn_attention(device)
    family = FAMILIES[cfg.model.family]
    samples = data.load_samples(cfg.data.instance_dir, cfg.data.instance_prompt, warn=warn)
    pipe = family.load_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.revision, cfg.model.quantize)
    if hasattr(family, "bind"):  # families whose training math needs the pipeline's noise schedule
        family = family.bind(pipe)
    max_len = cfg.model.max_sequence_length or family.default_max_sequence_length(cfg.model.path)
    classes = class_samples(cfg, family, pipe, device, max_len, main_first, warn)
    sample_prompts = cfg.sample.prompts or [cfg.data.instance_prompt or samples[0].caption]
    table = sorted({s.caption for s in samples + classes})
    index = {c: i for i, c in enumerate(table)}
    with on_device(device, *family.text_encoders(pipe)):
        embeds, pooled = family.encode_prompts(pipe, table, max_len)
        sample_embeds = family.encode_prompts(pipe, sample_prompts, max_len)
        negative = family.encode_prompts(pipe, [cfg.sample.negative_prompt], max_len)

    def cache(items: list[data.Sample], seed: int) -> Cache:
        lat = encode_folder(family, pipe, items, cfg.data.resolution, cfg.data.center_crop,
                            cfg.data.random_flip, seed)
        return Cache(lat, torch.tensor([index[s.caption] for s in items]))

    with on_device(device, pipe.vae):
        instance = cache(samples, cfg.train.seed)
        prior = cache(classes, cfg.train.seed + 1) if classes else None
    pipe.transformer.to(device)  # the encoders are back on the CPU: the loop needs only the transformer
    evaluator = None
    if evaluate and metrics.is_toy_model(cfg.model.path):  # toy-sized: its prompts are encoded on the CPU
        s = cfg.sample
        evaluator = metrics.ToyEvaluator(family, pipe, max_len, s.resolution or cfg.data.resolution, s.steps,
                                         s.guidance, s.true_cfg)
    h, w = instance.latents.shape[-2:]
    img_ids = family.image_ids(h, w, device=device)
    return Prepared(family, pipe, device, instance, prior, embeds, pooled, sample_prompts, sample_embeds,
                    negative, max_len, img_ids, {"images": len(samples), "class_images": len(classes)},
                    evaluator=evaluator, dtype=pipe.transformer.dtype)
