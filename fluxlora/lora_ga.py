"""LoRA-GA (Wang, Yu, Li, arXiv 2407.05000; docs/methods.md section 9): the adapter starts in the direction of
the full fine-tuning gradient, so its first steps move the model as full fine-tuning would.

  1. G = the loss gradient dL/dW of every target weight over the first adapter.sb_batches micro-batches
     (the gradient pass LoRA-SB uses: same batches, noise and sigmas as training starts with);
  2. the top 2r singular vectors of G (randomized SVD, q = min(4r, n, m) columns, 4 subspace iterations, as
     the authors' code and peft): G ~ U S V^T;
  3. A0 = V[:, :r]^T c and B0 = U[:, r:2r] c ("ArB2r") with the "stable" scale c = n^(1/4) / sqrt(gamma),
     n the layer's output size, gamma = 16 (the authors' code and peft's LoraGAConfig defaults);
  4. the product s B0 A0 is cancelled by the frozen offset adapter (offset_layers.py), as for PiSSA: step 0
     is the base model and the base weights are never rewritten (docs/design.md decision 1).

The authors' code scales both factors by c and leaves the singular values out; peft 0.21's ``lora_ga_init``
instead multiplies B by diag(S[r:2r]) and scales only B. We follow the authors; the test checks both
relations to peft's factors exactly (tests/test_lora_ga.py). The singular vectors do not depend on G's
overall scale, so summing or averaging the batches' gradients gives the same init.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fluxlora import inits

METHOD = "lora_ga"
GAMMA = 16.0
SVD_NITER = 4


def stable_scale(n: int, gamma: float = GAMMA) -> float:
    """c = n^(1/4) / sqrt(gamma): the factor on A0 and B0 that keeps the output's scale independent of the
    layer width (the paper's "scale stability")."""
    return n ** 0.25 / math.sqrt(gamma)


@torch.no_grad()
def factors(G: Tensor, rank: int, generator: torch.Generator | None = None,
            gamma: float = GAMMA) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(A0 (r, m), B0 (n, r), stats) from the gradient G (n, m), fp32 on G's device."""
    if G.ndim != 2:
        raise inits.InitError(f"{METHOD}: the gradient must be 2-D (got {tuple(G.shape)})")
    n, m = G.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= 2 * rank <= min(n, m):
        raise inits.InitError(f"{METHOD} takes 2r singular vectors: 2 x rank must be in [2, min(n, m)] = "
                              f"[2, {min(n, m)}] on a layer of shape (n={n}, m={m}) (got rank {rank!r}) -> fix: "
                              f"use adapter.rank <= {min(n, m) // 2} or leave this layer out of the targets")
    G = G.float()
    total = float(G.square().sum())
    if total == 0.0:
        raise inits.InitError(f"{METHOD}: the loss gradient of this layer's weight is zero on every estimation "
                              "batch, so there is no direction to start from -> fix: leave the layer out of the "
                              "targets or use another init")
    U, S, V = inits._svd_lowrank(G, min(4 * rank, n, m), SVD_NITER, generator)
    c = stable_scale(n, gamma)
    A0 = (V[:, :rank].T * c).contiguous()
    B0 = (U[:, rank:2 * rank] * c).contiguous()
    stats = {"gamma": gamma, "c": c, "sigma_1": float(S[0]),
             "energy_2r": float(S[:2 * rank].square().sum()) / total}
    return A0, B0, stats


def layer_init(layer: nn.Module, G: Tensor, rank: int, scale: float, lr1: float, gen: torch.Generator):
    """One layer's init (initpass.py): ((A0, B0), stats) from its gradient; the pair layer's trained factors
    start at (A0, B0) and its frozen offset holds (A0, -B0). ``scale`` and ``lr1`` do not enter the init
    (its stable scale is the method's own)."""
    A0, B0, stats = factors(G, rank, gen)
    return (A0, B0), stats
