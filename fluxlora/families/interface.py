"""The written family interface: what the trainer, the sampler and the bench ask of a model family.

A family owns its conditioning. ``encode_prompts`` turns captions into the family's own `Cond` (text
tensors, one row per prompt, cached on the CPU); ``condition`` adds what the denoiser needs for one batch of
latents (FLUX: position ids and the guidance value; SDXL: the size ids); ``predict`` consumes it. The trainer
never looks inside a `Cond`: it selects rows, expands and moves it. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


class Cond:
    """Named conditioning tensors: ``rows`` have one row per prompt (dim 0), ``shared`` hold per-batch
    values (position ids, a guidance scale). Read a field as an attribute: ``cond.embeds``."""

    __slots__ = ("rows", "shared")

    def __init__(self, rows: dict[str, Tensor], shared: dict[str, Any] | None = None):
        object.__setattr__(self, "rows", dict(rows))
        object.__setattr__(self, "shared", dict(shared or {}))

    def __getattr__(self, name: str):
        for table in (object.__getattribute__(self, "rows"), object.__getattribute__(self, "shared")):
            if name in table:
                return table[name]
        raise AttributeError(f"this conditioning has no field {name!r}")

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def select(self, index) -> "Cond":
        """The rows ``index`` (an index tensor, list or slice) of every row tensor."""
        return Cond({k: v[index] for k, v in self.rows.items()}, self.shared)

    def expand(self, n: int) -> "Cond":
        """A one-row conditioning repeated ``n`` times (a view, no copy)."""
        return Cond({k: v.expand(n, *v.shape[1:]) for k, v in self.rows.items()}, self.shared)

    @staticmethod
    def cat(parts: list["Cond"]) -> "Cond":
        """The rows of several conditionings of the same family, in order (shared values: the first's)."""
        return Cond({k: torch.cat([p.rows[k] for p in parts]) for k in parts[0].rows}, parts[0].shared)

    def with_shared(self, **values) -> "Cond":
        return Cond(self.rows, {**self.shared, **values})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Cond":
        """Every tensor to ``device``; floating-point ones also to ``dtype`` (masks and ids keep theirs)."""
        def move(v):
            if not isinstance(v, Tensor):
                return v
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        return Cond({k: move(v) for k, v in self.rows.items()}, {k: move(v) for k, v in self.shared.items()})


@runtime_checkable
class Family(Protocol):
    """One model family. Implementations: families/flux.py, sd3.py, unet.py (registered in SPECS)."""

    name: str
    lora_component: str  # the pipeline attribute of the denoiser, and save/load_lora_weights' prefix
    target_presets: dict[str, list[str]]  # attn / attn_context / wide -> module-name suffixes in the blocks

    def pipeline_class(self) -> type: ...

    def load(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none") -> Any:
        """The pipeline from a resolved local directory or hub id (modelpath.resolve), all frozen."""

    def bind(self, pipe) -> "Family":
        """The family with what its training math reads from the pipeline (noise schedule, VAE factor)."""

    def denoiser(self, pipe) -> torch.nn.Module: ...

    def text_encoders(self, pipe) -> list[torch.nn.Module]: ...

    def default_max_sequence_length(self) -> int: ...

    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond: ...

    def encode_images(self, pipe, pixels: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> normalized latents [B, C, h, w] on the CPU."""

    def pack(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> the denoiser's input layout."""

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        """The denoiser's conditioning for a batch of latents of size ``latent_hw``."""

    def sample_sigmas(self, n: int, scheme: str, generator: torch.Generator, logit_mean: float, logit_std: float,
                      mode_scale: float, shift: float) -> Tensor:
        """The training noise levels t of ``n`` samples (flow: sigmas; DDPM: uniform draws)."""

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, regression target)."""

    def loss_weights(self, scheme: str, t: Tensor) -> Tensor: ...

    def predict(self, model, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]: ...

    def pixel_multiple(self, pipe) -> int:
        """Training image sides must be multiples of this many px (VAE factor x the denoiser's patch)."""

    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """PIL images through the family's own pipeline call, one per seed (noise from a CPU generator)."""
