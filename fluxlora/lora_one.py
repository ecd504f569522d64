"""LoRA-One (Zhang et al., ICML 2025, arXiv 2502.01235; docs/methods.md section 10): the adapter starts at the
best rank-r approximation of one full gradient descent step, normalised, and trains from there.

  1. G = the loss gradient dL/dW of every target weight over the first adapter.sb_batches micro-batches
     (the gradient pass LoRA-SB and LoRA-GA use);
  2. the top r singular triplets of -G (randomized SVD, q = min(512, n, m) columns, 16 subspace
     iterations, as the authors' code): -G ~ U S V^T;
  3. B0 = U_r S_r^(1/2) / sqrt(S_1 gamma), A0 = S_r^(1/2) V_r^T / sqrt(S_1 gamma), gamma = 16, so that
     B0 A0 = trunc_r(-G) / (S_1 gamma): the first step's direction with spectral norm 1 / gamma.
  4. No offset (as the authors' code, which leaves W as it is): the step-0 model is W + s B0 A0, by design;
     the whole delta exports as a plain rank-r LoRA on the pristine base (methods.py start "whole").

The authors' preconditioned variant changes the optimizer's step (a per-factor preconditioner), not the init;
it is not part of this method.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxlora import inits

METHOD = "lora_one"
GAMMA = 16.0
SVD_Q, SVD_NITER = 512, 16


@torch.no_grad()
def factors(G: Tensor, rank: int, generator: torch.Generator | None = None,
            gamma: float = GAMMA) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(A0 (r, m), B0 (n, r), stats) from the gradient G (n, m), fp32 on G's device."""
    if G.ndim != 2:
        raise inits.InitError(f"{METHOD}: the gradient must be 2-D (got {tuple(G.shape)})")
    n, m = G.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, m):
        raise inits.InitError(f"rank must be in [1, min(n, m)] = [1, {min(n, m)}] for {METHOD} on a layer of shape "
                              f"(n={n}, m={m}) (got {rank!r}) -> fix: use adapter.rank <= {min(n, m)} or leave this "
                              "layer out of the targets")
    step = -G.float()
    total = float(step.square().sum())
    if total == 0.0:
        raise inits.InitError(f"{METHOD}: the loss gradient of this layer's weight is zero on every estimation "
                              "batch, so there is no step to start from -> fix: leave the layer out of the targets "
                              "or use another init")
    U, S, V = inits._svd_lowrank(step, min(SVD_Q, n, m), SVD_NITER, generator)
    root = (S[:rank] / (S[0] * gamma)).sqrt()
    B0 = (U[:, :rank] * root).contiguous()
    A0 = (root[:, None] * V[:, :rank].T).contiguous()
    stats = {"gamma": gamma, "sigma_1": float(S[0]), "energy_r": float(S[:rank].square().sum()) / total}
    return A0, B0, stats


def layer_init(layer: nn.Module, G: Tensor, rank: int, scale: float, lr1: float, gen: torch.Generator):
    """One layer's init (initpass.py): ((A0, B0), stats) from its gradient, trained from there (WHOLE); ``scale``
    and ``lr1`` do not enter it (the authors' normalisation by S_1 gamma)."""
    A0, B0, stats = factors(G, rank, gen)
    return (A0, B0), stats
