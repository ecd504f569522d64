"""The data-driven inits' driver (methods.py: needs GRADIENTS, ACTIVATIONS, ...; docs/methods.md section 13).

A data-driven init reads one statistic per target layer from a pass over training micro-batches (an fp32 n x m
gradient, or an m x m input covariance). Holding every target's statistic at once is what does not fit at
FLUX scale (190 attention layers: 7.2 GB), so the driver:

1. splits the targets, in order, into chunks whose statistics fit ``adapter.init_pass_gb`` (a target larger
   than the budget is a chunk of its own);
2. runs the pass once per chunk, over the same micro-batches each time (the pass seeds its own generator), on
   the pristine base;
3. turns each layer's statistic into its factors at once (the method's ``layer_init(layer, stat, rank, scale,
   lr1, gen) -> (tensors, stats)``), frees it, and keeps
   only the rank-r factors;
4. does this for every arm of the run that reads the same pass (``Request``s of one kind), so one pass serves
   them all; the other arms' factors wait in a per-run cache until their arm starts (``Shared``).

The adapter layers are attached afterwards and ``write`` copies the factors in. Each arm's factors are the
same whether it is computed alone or with others: one CPU generator per arm, seeded with train.seed,
consumed layer after layer in target order, and ``layer_init`` never changes the statistic it reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fluxlora import adapters, methods
from fluxlora.errors import InitError
from fluxlora.layers import write_factors

GIB = 1024 ** 3


@dataclass(frozen=True)
class Request:
    """One arm's data-driven init: its method, rank, adapter scale and first non-zero learning rate; ``key``:
    what its pass depends on (arms share a pass only when it is equal)."""

    method: str
    rank: int
    scale: float
    lr1: float
    key: tuple = ()


def request(cfg, method: str, targets: list[str]) -> Request:
    """The request of the arm whose config (overrides applied) is ``cfg``."""
    t, a, m = cfg.train, cfg.adapter, methods.get(method)
    key = (tuple(targets), t.seed, t.batch_size, a.sb_batches, cfg.data.prior_loss_weight, a.init_pass_gb)
    scale = m.fixed_scale if m.fixed_scale is not None else adapters.scale_for(
        a.rank, a.effective_alpha, a.scaling, a.alpha_coefficient)
    return Request(method, a.rank, scale, t.lr / max(1, t.warmup_steps), key)


@dataclass(frozen=True)
class Pass:
    """One pass kind: ``run(targets) -> {name: statistic}`` on the pristine base, ``nbytes(layer)`` the size of
    one target's statistic."""

    run: Callable[[list[str]], dict]
    nbytes: Callable[[nn.Module], int]


@dataclass
class Factors:
    """One arm's init, waiting for its adapter layers: the layer kind that receives it, per target the
    method's tensors and stats, and how the pass was run."""

    layer: str
    tensors: dict[str, tuple]
    stats: dict[str, dict]
    chunks: int = 1
    peak_bytes: int = 0
    pass_seconds: float = 0.0  # the pass itself, shared by every arm in ``shared_with``
    math_seconds: float = 0.0  # this arm's per-layer factors
    shared_with: tuple = ()


def chunks(model: nn.Module, targets: list[str], nbytes: Callable[[nn.Module], int], budget: int) -> list[list[str]]:
    """The targets in order, cut into runs whose statistics sum to at most ``budget`` bytes."""
    out: list[list[str]] = []
    used = budget + 1
    for name in targets:
        size = nbytes(model.get_submodule(name))
        if out and used + size <= budget:
            out[-1].append(name)
            used += size
        else:
            out.append([name])
            used = size
    return out


def compute(model: nn.Module, requests: list[Request], stat_pass: Pass, targets: list[str], seed: int,
            budget: int) -> dict[str, Factors]:
    """Every request's factors from one chunked pass: {method: Factors}."""
    gens = {r.method: torch.Generator("cpu").manual_seed(seed) for r in requests}
    out = {r.method: Factors(methods.get(r.method).layer, {}, {}) for r in requests}
    fns = {r.method: methods.get(r.method).layer_init_fn() for r in requests}
    parts = chunks(model, targets, stat_pass.nbytes, budget)
    peak = max(sum(stat_pass.nbytes(model.get_submodule(n)) for n in part) for part in parts)
    pass_seconds = 0.0
    for part in parts:
        t0 = time.perf_counter()
        stats = stat_pass.run(part)
        pass_seconds += time.perf_counter() - t0
        for name in part:
            layer, stat = model.get_submodule(name), stats.pop(name)
            for r in requests:
                t0 = time.perf_counter()
                try:
                    out[r.method].tensors[name], out[r.method].stats[name] = fns[r.method](
                        layer, stat, r.rank, r.scale, r.lr1, gens[r.method])
                except InitError as e:
                    raise InitError(f"{name} ({layer.out_features}x{layer.in_features}): {e}") from e
                out[r.method].math_seconds += time.perf_counter() - t0
            del stat
        del stats
    for f in out.values():
        f.chunks, f.peak_bytes, f.pass_seconds = len(parts), peak, pass_seconds
        f.shared_with = tuple(r.method for r in requests)
    return out


@dataclass
class Shared:
    """The run's cache of computed inits: the first arm of a pass kind computes every pending arm's factors
    (``pending``: the arms of the run that still start from their init), later arms take theirs."""

    pending: list[Request] = field(default_factory=list)
    ready: dict[str, Factors] = field(default_factory=dict)

    def factors(self, model, request: Request, kind: str, stat_pass: Pass, targets: list[str], seed: int,
                budget: int) -> Factors:
        if request.method not in self.ready:
            same = [r for r in self.pending if methods.get(r.method).needs == kind and r.key == request.key
                    and r.method != request.method]
            self.ready.update(compute(model, [request, *same], stat_pass, targets, seed, budget))
            self.pending = [r for r in self.pending if r.method not in self.ready]
        return self.ready.pop(request.method)


@torch.no_grad()
def write(model: nn.Module, data: Factors, rank: int, scale: float, lr1: float, seed: int) -> dict[str, dict]:
    """The data-driven methods' ``impl`` (methods.py): copy each target's factors into its attached layer as
    the layer kind holds them; returns the per-layer stats for the init record."""
    put = _WRITERS[data.layer]
    for name, tensors in data.tensors.items():
        put(model.get_submodule(name), *tensors)
    return data.stats


def _write_core(layer, A, B, R) -> None:
    from fluxlora.lora_sb import write_core

    write_core(layer, A, B, R)


_WRITERS = {methods.LORA: lambda layer, A0, B0: write_factors(layer, A0, B0, offset=False),
            methods.PAIR: lambda layer, A0, B0: write_factors(layer, A0, B0, offset=True),
            methods.CORE: _write_core}


def describe(method: str, data: Factors, targets: int, budget: int) -> str:
    """One line for the log: how the pass ran and what it held at most."""
    which = methods.PASSES[methods.get(method).needs][1]
    shared = f", shared by {', '.join(data.shared_with)}" if len(data.shared_with) > 1 else ""
    held = f"{data.peak_bytes / GIB:.2f} GiB" if data.peak_bytes >= GIB else f"{data.peak_bytes / 2 ** 20:.1f} MiB"
    return (f"{method}: {which} over {targets} targets in {data.chunks} chunk(s), at most {held} of statistics "
            f"at once (adapter.init_pass_gb = {budget / GIB:g}); "
            f"pass {data.pass_seconds:.2f} s{shared}; factors {data.math_seconds:.2f} s")
