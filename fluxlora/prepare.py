"""Everything computed once before the arms train: the base pipeline, cached latents and text embeddings.

VAE latents are cached once per image (and its mirror when flipping), text embeddings once per unique
caption; afterwards the VAE and text encoders leave the accelerator (docs/design.md decision 4).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora import block_swap, buckets, captions, data, families, initpass, masks, metrics, modelpath, validation
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import on_device


@dataclass
class Group:
    """The cached images of one bucket (buckets.py)."""

    size: tuple[int, int]  # (width, height) in px
    members: torch.Tensor  # [n] sample indices (rows of Cache.caption_idx)
    latents: torch.Tensor  # [n, V, C, h, w], V = 2 with flip variants else 1
    masks: torch.Tensor | None = None  # [n, V, 1, h, w] latent-grid loss masks (masks.py), None: no image has one


@dataclass
class Cache:
    groups: list[Group]  # one per bucket; a square run has one
    caption_idx: torch.Tensor  # [N, K] indices into the prompt table: each image's K caption variants
    repeats: int = 1  # times each image appears in an epoch (data.repeats)
    dropout: float = 0.0  # data.caption_dropout
    empty: int | None = None  # index of the empty caption (dropout)
    background_weight: float = 0.0  # data.mask_background_weight

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(g.members) for g in self.groups)


@dataclass
class Prepared:
    family: object  # families.interface.Family, bound to the pipeline
    pipe: object
    model: torch.nn.Module  # the family's denoiser (transformer or UNet): where the adapters go
    device: torch.device
    instance: Cache
    prior: Cache | None
    text: Cond  # the family's conditioning of the unique captions, one row each
    sample_prompts: list[str]
    sample_cond: Cond  # one row per sample prompt
    negative: Cond  # one row: sample.negative_prompt
    max_len: int
    stats: dict = field(default_factory=dict)
    autocast: object = contextlib.nullcontext  # accelerate's mixed-precision context
    evaluator: object = None  # metrics.ToyEvaluator on the toy world, else None
    dtype: torch.dtype = torch.float32  # the denoiser's compute dtype
    process_index: int = 0  # this process's index in data-parallel training (accelerate launch / torchrun)
    num_processes: int = 1  # number of data-parallel processes
    validation: object = None  # validation.ValidationSet, or None when data.validation asks for nothing
    subject_metrics: object = None  # subject_metrics.SubjectMetrics with metrics.subject, on the main process
    init_cache: initpass.Shared = field(default_factory=initpass.Shared)  # data-driven inits shared by the arms

    @property
    def main(self) -> bool:
        """Only the main process writes to the run folder (samples, metrics, checkpoints, exports)."""
        return self.process_index == 0


def training_views(samples: list[data.Sample], layout: buckets.Layout, center_crop: bool, flip: bool, seed: int):
    """Bucket by bucket, each member as the trainer caches it: (bucket, sample index, pixel views
    [V, 3, H, W] (V = 2 with the mirror), mask views [V, 1, H, W] or None without a mask); the random crops
    come from one Random(seed) drawn in this order."""
    rng = random.Random(seed)
    for b, (size, members) in enumerate(zip(layout.sizes, layout.members)):
        for i in members:
            s = samples[i]
            pix, mask = data.prepare_pair(s.image, s.mask, size, center_crop=center_crop, rng=rng)
            views = torch.stack([pix, data.hflip(pix)]) if flip else pix[None]
            mask_views = None if mask is None else (torch.stack([mask, mask.flip(-1)]) if flip else mask[None])
            yield b, i, views, mask_views


def encode_groups(family, pipe, samples: list[data.Sample], layout: buckets.Layout, center_crop: bool, flip: bool,
                  seed: int) -> list[Group]:
    """Each bucket's latents, and when any image has a loss mask the masks cut like their images and
    averaged onto the latent grid (ones for images without one)."""
    any_mask = any(s.mask is not None for s in samples)
    lat: list[list] = [[] for _ in layout.sizes]
    cut: list[list] = [[] for _ in layout.sizes]
    for b, _, views, mask_views in training_views(samples, layout, center_crop, flip, seed):
        lat[b].append(family.encode_images(pipe, views))
        if any_mask:
            cut[b].append(mask_views if mask_views is not None else torch.ones(len(views), 1, *views.shape[-2:]))
    groups = []
    for size, members, latents, masks_b in zip(layout.sizes, layout.members, lat, cut):
        latents = torch.stack(latents)
        grid = masks.to_latent_grid(torch.stack(masks_b), *latents.shape[-2:]) if any_mask else None
        groups.append(Group(size, torch.tensor(members), latents, grid))
    return groups


def generate_class_images(family, pipe, folder: Path, embeds, first: int, count: int, resolution: int,
                          steps: int) -> None:
    """Images ``first..count-1`` of the class prompt (cached embeddings) from the base model."""
    for i in range(first, count):
        (img,) = family.generate(pipe, embeds, None, [i], resolution=resolution, steps=steps, guidance=3.5,
                                 true_cfg=1.0)
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
            denoiser = family.denoiser(pipe)
            with block_swap.resident(denoiser, cfg.train.blocks_to_swap, device, cfg.source):
                generate_class_images(family, pipe, folder, embeds, have, d.num_class_images, d.largest,
                                      cfg.sample.steps)
            denoiser.to("cpu")
    return data.load_samples(folder, d.class_prompt, warn=warn)


def avoid_cudnn_attention(device: torch.device) -> None:
    """Training on CUDA uses the flash / memory-efficient attention kernels, not cuDNN's: on an H100 with
    torch 2.11 + CUDA 13, cuDNN's attention backward hit an illegal memory access on FLUX's joint attention
    (even 2+2 blocks at 512 px); with cuDNN attention off the same steps run (BENCHMARKS.md, GPU section)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def encode_all(family, pipe, texts: list[str], max_len: int, chunk: int = 32) -> Cond:
    """Every text once, ``chunk`` at a time: a text encoder's activations grow with its batch (T5-XXL's
    attention scores alone are GBs for hundreds of 512-token captions)."""
    return Cond.cat([family.encode_prompts(pipe, texts[i:i + chunk], max_len) for i in range(0, len(texts), chunk)])


def _caches(cfg, family, pipe, device, samples, classes, table: captions.CaptionTable,
            layout: buckets.Layout) -> tuple[Cache, Cache | None]:
    """VAE latents of the instance and class images (the VAE visits the accelerator for this only). Class
    images are cut to every instance bucket: a batch's prior rows share its size."""
    d = cfg.data
    with on_device(device, pipe.vae):
        groups = encode_groups(family, pipe, samples, layout, d.center_crop, d.random_flip, cfg.train.seed)
        instance = Cache(groups, torch.tensor([table.rows[s.caption] for s in samples]), d.repeats,
                         d.caption_dropout, table.empty, d.mask_background_weight)
        prior = None
        if classes:  # class images keep their caption as written (no shuffling, no dropout)
            every = buckets.Layout(layout.sizes, (tuple(range(len(classes))),) * len(layout.sizes))
            pgroups = encode_groups(family, pipe, classes, every, d.center_crop, d.random_flip, cfg.train.seed + 1)
            prior = Cache(pgroups, torch.tensor([table.rows[s.caption][:1] for s in classes]))
    return instance, prior


def bucket_layout(cfg, family, pipe, samples: list[data.Sample], warn) -> buckets.Layout:
    """The instance images' buckets, printed as a table, with a line for each bucket too small for a batch."""
    layout = buckets.for_run(cfg.model, cfg.data, [s.image.size for s in samples])
    buckets.check_step(layout, family.pixel_multiple(pipe))
    if len(layout.sizes) > 1 or layout.sizes[0][0] != layout.sizes[0][1]:
        warn(f"{len(layout.sizes)} training size(s) (width x height: images):")
        for line in layout.table():
            warn(line)
    for line in layout.warnings([s.path.name for s in samples], cfg.train.batch_size):
        warn(line)
    return layout


def prepare(cfg, device: torch.device, warn=print, main_first=contextlib.nullcontext,
            evaluate: bool = True) -> Prepared:
    """``main_first``: a context in which the main process runs first (class images are generated
    once); ``evaluate``: build the toy evaluator (only the main process logs metrics)."""
    avoid_cudnn_attention(device)
    family = families.get(cfg.model.family)
    d = cfg.data
    samples = data.load_samples(d.instance_dir, d.instance_prompt, recursive=d.recursive, alpha_mask=d.alpha_mask,
                                warn=warn)
    samples, held = validation.held_out(cfg, samples, warn)
    m = cfg.model
    pipe = modelpath.load_base(family, m.path, m.dtype, m.revision, m.quantize)
    family = family.bind(pipe)
    max_len = modelpath.max_sequence_length(family, m.path, m.max_sequence_length)
    classes = class_samples(cfg, family, pipe, device, max_len, main_first, warn)
    sample_prompts = cfg.sample.prompts or [cfg.data.instance_prompt or samples[0].caption]
    table = captions.build([s.caption for s in samples], d.shuffle_tags, d.tag_variants, d.keep_tokens,
                           d.caption_dropout, cfg.train.seed, fixed=[s.caption for s in classes])
    with on_device(device, *family.text_encoders(pipe)):
        text = encode_all(family, pipe, table.texts, max_len)  # every variant once: never per step
        sample_cond = family.encode_prompts(pipe, sample_prompts, max_len)
        negative = family.encode_prompts(pipe, [cfg.sample.negative_prompt], max_len)
        val_texts = validation.texts(cfg, held)
        val_text = encode_all(family, pipe, val_texts, max_len) if val_texts else None
    layout = bucket_layout(cfg, family, pipe, samples, warn)
    instance, prior = _caches(cfg, family, pipe, device, samples, classes, table, layout)
    model = family.denoiser(pipe)
    checks = validation.build(cfg, family, pipe, device, held, val_text)
    if not cfg.train.blocks_to_swap:  # with block swap, each arm places the model (arms.train_arm)
        model.to(device)  # the encoders are back on the CPU: the loop needs only the denoiser
    evaluator = None
    if evaluate and modelpath.is_toy(m.path):  # toy-sized: its prompts are encoded on the CPU
        s = cfg.sample
        evaluator = metrics.ToyEvaluator(family, pipe, max_len, s.resolution or cfg.data.largest, s.steps,
                                         s.guidance, s.true_cfg)
    scorer = None
    if evaluate and cfg.metrics.subject:
        from fluxlora.subject_metrics import SubjectMetrics

        scorer = SubjectMetrics(cfg.metrics.dino, cfg.metrics.clip, [s.image for s in samples], device)
    return Prepared(family, pipe, model, device, instance, prior, text, sample_prompts, sample_cond, negative,
                    max_len, {"images": len(samples), "class_images": len(classes),
                                   "buckets": len(layout.sizes)}, evaluator=evaluator,
                    dtype=model.dtype, validation=checks, subject_metrics=scorer)
