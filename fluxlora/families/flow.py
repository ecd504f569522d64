"""Flow-matching training math shared by the flow families (FLUX.1, SD3), as diffusers' training scripts:
x_t = (1 - s) x0 + s n, the denoiser predicts the velocity n - x0; timestep density and loss weighting
from diffusers' training_utils; the scheduler's static shift s' = shift s / (1 + (shift - 1) s)."""

from __future__ import annotations

import torch


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(n: int, scheme: str, generator: torch.Generator, logit_mean: float, logit_std: float,
                  mode_scale: float, shift: float) -> torch.Tensor:
    """Training sigmas in (0, 1): the density of ``scheme`` (uniform, logit_normal, mode), then the shift."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    name = "none" if scheme == "uniform" else scheme
    u = compute_density_for_timestep_sampling(name, n, logit_mean, logit_std, mode_scale, generator=generator)
    return shift_sigmas(u.float(), shift)


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow interpolation and its velocity target: (x_t, n - x0)."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas)

