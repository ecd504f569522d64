"""The activation pass of the data-driven inits (methods.py, needs ACTIVATIONS): the centred second moment of
every target layer's input over the pass's micro-batches, accumulated by forward pre-hooks with nothing
requiring a gradient (EVA reads its top eigenvectors, docs/methods.md section 11).

Per target one ``Moments``: the row count, the mean (fp64, m) and the centred sum of outer products
M2 = sum (x - mean)(x - mean)^T (fp32, m x m), updated call by call with the pairwise formula of Chan,
Golub and LeVeque (each call's rows centred on their own mean, then one rank-1 correction), so no raw
uncentred sum whose cancellation would lose the variance is ever formed. Memory: 4 m^2 + 8 m bytes per
target, on the layer's device, plus one fp32 copy of the call's rows while the hook runs. FLUX's 190
attention layers (m = 3072): 190 x 37.8 MB = 7.2 GB, the same as the gradient pass's n x m accumulators;
the wide preset's 38 feed-forward down projections (m = 12288) would add 38 x 604 MB = 23 GB."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Moments:
    """Rows seen, their mean and their centred second moment M2 = X_c^T X_c of one layer's inputs."""

    count: int
    mean: Tensor  # fp64 (m,)
    m2: Tensor  # fp32 (m, m)

    @classmethod
    def empty(cls, m: int, device=None) -> "Moments":
        return cls(0, torch.zeros(m, dtype=torch.float64, device=device),
                   torch.zeros(m, m, dtype=torch.float32, device=device))

    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        """Merge the rows (k, m) into the moments (Chan et al.: M2 += M2_rows + d d^T n k / (n + k))."""
        k = rows.shape[0]
        if k == 0:
            return
        x = rows.float()
        mean_k = x.sum(0, dtype=torch.float64) / k
        xc = x - mean_k.float()
        n, total = self.count, self.count + k
        delta = mean_k - self.mean
        self.m2.addmm_(xc.T, xc)
        d = delta.float()
        self.m2.addr_(d, d, alpha=n * k / total)
        self.mean.add_(delta * (k / total))
        self.count = total

    def covariance(self) -> Tensor:
        """The unbiased covariance M2 / (count - 1) (fp32)."""
        return self.m2 / max(self.count - 1, 1)


def stat_bytes(layer: nn.Module) -> int:
    """Bytes of one target's Moments: fp32 (m, m) and fp64 (m,)."""
    m = layer.in_features
    return 4 * m * m + 8 * m


def _capture(stat: Moments):
    """Forward pre-hook adding the layer's input rows (every token of the call) to ``stat``."""
    def hook(module, args):
        x = args[0].detach()
        stat.add(x.reshape(-1, x.shape[-1]))
    return hook


@contextlib.contextmanager
def layer_inputs(model: nn.Module, targets: list[str]):
    """Inside the block, every forward adds each target layer's input rows into the yielded dict
    {name: Moments on the layer's device}. The hooks are removed on exit, whatever happens."""
    stats, handles = {}, []
    try:
        for name in targets:
            layer = model.get_submodule(name)
            stats[name] = Moments.empty(layer.in_features, layer.weight.device)
            handles.append(layer.register_forward_pre_hook(_capture(stats[name])))
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def combine(stats: dict[str, Moments]) -> None:
    """Data-parallel: replace each process's moments of its rows by the moments of all processes' rows, in
    place and exactly (up to summation order): N = sum n_p, mean = sum n_p mean_p / N and
    M2 = sum_p [M2_p + n_p (mean_p - mean)(mean_p - mean)^T], each term formed locally, then all-reduced."""
    import torch.distributed as dist

    for s in stats.values():
        count = torch.tensor([float(s.count)], dtype=torch.float64, device=s.mean.device)
        weighted = s.mean * s.count
        dist.all_reduce(count), dist.all_reduce(weighted)
        mean = weighted / count.clamp(min=1.0)
        shift_to(s, mean)
        dist.all_reduce(s.m2)
        s.count, s.mean = int(count.item()), mean


def shift_to(s: Moments, mean: Tensor) -> None:
    """Add the rank-1 term n (mean_s - mean)(mean_s - mean)^T that moves M2 from s's own mean to ``mean``."""
    d = (s.mean - mean).float()
    s.m2.addr_(d, d, alpha=float(s.count))
