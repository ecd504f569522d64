"""CorDA's knowledge-preserved mode (``corda_kpm``; arXiv 2406.05223, docs/methods.md section 12): the adapter
starts on the r SMALLEST components of W in the metric of the covariance of the layer's inputs on the
prior-preservation (class) images (corda.prior_activation_pass, methods.py PRIOR_ACTIVATIONS): training moves
the directions the class knowledge uses least, and the frozen base keeps the ones it uses most."""

from __future__ import annotations

import torch
from torch import nn

from fluxlora import corda
from fluxlora.activations import Moments


def layer_init(layer: nn.Module, stat: Moments, rank: int, scale: float, lr1: float, gen: torch.Generator):
    """One layer's init (initpass.py): ((A0, B0), stats); the pair layer trains from (A0, B0) and its frozen
    offset holds (A0, -B0). ``lr1`` and ``gen`` do not enter the init (the decomposition is exact);
    ``scale``: the arm's adapter scale s (s B0 A0 = the kept components, as peft's corda)."""
    return corda.layer_init("kpm", layer, stat, rank, scale=scale)
