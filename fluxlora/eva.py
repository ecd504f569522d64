"""EVA, Explained Variance Adaptation (Paischer et al., arXiv 2410.07170; docs/methods.md section 11): A starts
at the directions in which the layer's inputs on the training data vary most, B at zero, so step 0 is the base.

  1. The activation pass (activations.py): per target, the centred second moment M2 = X_c^T X_c of the
     layer's input rows (every token) over the first adapter.sb_batches micro-batches, on the pristine base;
  2. its top r eigenvectors (exact symmetric eigendecomposition, fp32 on the layer's device): the top r right
     singular vectors of the centred input matrix X_c, which peft's incremental PCA estimates;
  3. A0 = V_r^T (unit rows; each row's sign set so its largest-magnitude entry is positive, as peft's
     svd_flip), B0 = 0: a plain LoRA whose step 0 is the base (methods.py start "zero").

No rank redistribution (peft's rho = 1): every layer keeps adapter.rank, so checkpoints and exports need no
per-layer rank pattern; peft's adjust_scaling_factors then changes nothing. peft stops its incremental PCA
when successive estimates agree (tau); we decompose the whole pass's statistic exactly instead, its limit.
``whiten`` (peft's option, off by default there and here): A0 = V_r^T / S_r^(1/2), S the singular values of
X_c.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxlora import inits
from fluxlora.activations import Moments

METHOD = "eva"


def flip_signs(V: Tensor) -> Tensor:
    """peft's svd_flip on the rows of Vt: each row's largest-magnitude entry made positive."""
    top = V.abs().argmax(dim=1)
    signs = torch.sign(V[torch.arange(V.shape[0], device=V.device), top])
    return V * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]


def _check(stat: Moments, rank: int, n: int) -> None:
    m = stat.m2.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, m):
        raise inits.InitError(f"rank must be in [1, min(n, m)] = [1, {min(n, m)}] for {METHOD} on a layer of shape "
                              f"(n={n}, m={m}) (got {rank!r}) -> fix: use adapter.rank <= {min(n, m)} or leave this "
                              "layer out of the targets")
    if stat.count < 2:
        raise inits.InitError(f"{METHOD}: the activation pass saw {stat.count} input row(s) of this layer; the "
                              "variance of its inputs needs at least 2 -> fix: raise adapter.sb_batches")


@torch.no_grad()
def factors(stat: Moments, rank: int, n: int, whiten: bool = False) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(A0 (r, m), B0 = 0 (n, r), stats) from the moments of the layer's inputs; ``n``: its output size."""
    _check(stat, rank, n)
    M2 = stat.m2.float()
    M2 = (M2 + M2.T) / 2  # exactly symmetric for the eigensolver
    total = float(M2.diagonal().sum(dtype=torch.float64))
    if total <= 0.0:
        raise inits.InitError(f"{METHOD}: this layer's inputs are the same on every row of the activation pass, "
                              "so they vary in no direction -> fix: leave the layer out of the targets or use "
                              "another init")
    lam, V = torch.linalg.eigh(M2)
    lam, V = lam.flip(0)[:rank].clamp(min=0.0), V.flip(1)[:, :rank]
    A0 = flip_signs(V.T.contiguous())
    if whiten:
        if float(lam[-1]) <= 0.0:
            raise inits.InitError(f"{METHOD}: whitening divides by the singular values, and this layer's inputs "
                                  f"vary in fewer than {rank} directions")
        A0 = A0 / lam.pow(0.25)[:, None]
    B0 = torch.zeros(n, rank, dtype=A0.dtype, device=A0.device)
    stats = {"tokens": stat.count, "variance_1": float(lam[0]) / (stat.count - 1),
             "explained_r": float(lam.sum(dtype=torch.float64)) / total}
    return A0.contiguous(), B0, stats


def layer_init(layer: nn.Module, stat: Moments, rank: int, scale: float, lr1: float, gen: torch.Generator):
    """One layer's init (initpass.py): ((A0, 0), stats) from the moments of its inputs. ``scale``, ``lr1`` and
    ``gen`` do not enter the init (the eigendecomposition is exact and deterministic)."""
    A0, B0, stats = factors(stat, rank, layer.out_features)
    return (A0, B0), stats
