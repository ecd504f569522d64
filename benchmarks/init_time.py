"""Wall time and peak extra memory of each LoRA init on FLUX.1-dev target shapes, on this CPU.

Run (CI smoke):      python benchmarks/init_time.py --quick --threads 1
Run (default set):   python benchmarks/init_time.py --layers 190 --sample 5 --threads 1,2
Run (+ FF shapes):   python benchmarks/init_time.py --wide
Run (a subset):      python benchmarks/init_time.py --wide --sample 1 --methods lora,pissa_fast,loram,pissa

Shapes: the default target set is diffusers' to_q/to_k/to_v/to_out.0 = 19 double x 4 + 38 single x 3
= 190 Linear 3072x3072 (docs/methods.md section 1.5). --wide adds the double blocks' feed-forwards (ff and
ff_context, 19 x 2 each): 38 weights of 12288x3072 (3072 -> 12288) and 38 of 3072x12288 (back).
Weights: fp32 N(0, 0.02^2), one buffer per shape refilled in place before every layer (a new random
matrix per layer, no new allocation; the RNG is outside the timed region). Each method gets one
untimed warm-up call on a 256x256 matrix first (one-time library set-up is not counted). Per-layer time
is the median over the timed layers (>= 5 unless --sample is lower), at each --threads count in turn;
the reference row `W.var()` is one torch.var pass over the same weights (LoRAM's floor: it must read W).
eva reads no weight: its random n x m buffer stands for n input rows of the layer's m features (an m x m
activation statistic, the shape the activation pass holds per target), decomposed exactly (eigh).
Memory (Linux): peak process RSS (VmHWM, reset just before the call) minus the RSS just before it,
for one call in a fresh spawned process per (method, shape) that holds only that layer's weight --
what the OS saw (torch tensors plus LAPACK workspaces), not a count of tensor bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from fluxlora import activations, corda, eva, lora_ga, lora_one, lora_sb  # noqa: E402
from fluxlora.inits import INITS  # noqa: E402


def eva_layer(W: torch.Tensor, rank: int, scale: float, generator=None):
    """eva's per-layer math: the n x m buffer taken as n input rows of the layer's m features, folded into
    the (m x m) moments as the activation pass's hook does, then the exact eigendecomposition."""
    stat = activations.Moments.empty(W.shape[1])
    stat.add(W)
    return eva.factors(stat, rank, W.shape[0])


def corda_layer(W: torch.Tensor, rank: int, scale: float, generator=None):
    """corda_ipm's per-layer math: the n x m buffer is the weight and also n input rows folded into the moments;
    then the covariance, peft's damping (one m x m inverse) and the full SVD of W C' (kpm: the same work)."""
    stat = activations.Moments.empty(W.shape[1])
    stat.add(W)
    return corda.factors(W, corda.covariance(stat), rank, "ipm", scale)


# lora_sb's per-layer math only (sign, randomized SVD with niter 10, factors) on a random "gradient";
# its gradient pass over the data depends on the model and is timed by a training run (BENCHMARKS.md).
FNS = {**INITS, "lora_sb": lambda W, rank, scale, generator=None: lora_sb.factors(W, rank, 1e-4, generator),
       "lora_ga": lambda W, rank, scale, generator=None: lora_ga.factors(W, rank, generator),
       "lora_one": lambda W, rank, scale, generator=None: lora_one.factors(W, rank, generator),
       "eva": eva_layer, "corda_ipm": corda_layer}
VAR = "W.var()"  # the reference row: one pass over the weight
FNS[VAR] = lambda W, rank, scale, generator=None: torch.var(W)
METHODS = ["lora", "pissa", "pissa_fast", "loram", "olora", "milora", "lora_sb", "lora_ga", "lora_one", "eva",
           "corda_ipm"]
SLOW = {"pissa", "milora", "olora", "eva", "corda_ipm"}  # full SVD / QR / eigh: timed on --sample layers, then extrapolated
WEIGHT_STD = 0.02  # realistic scale of a FLUX linear weight
SCALE = 1.0  # s = alpha / r with alpha = r, as in the paper's FLUX run (docs/methods.md section 1.5)
TARGET_FAST, TARGET_FULL = 20.0, 500.0  # loram vs pissa_fast / vs pissa, per-layer speed-up
TARGET_VAR = 2.0  # loram at most this many W.var() passes


@dataclass
class Group:
    name: str
    n: int  # out_features
    m: int  # in_features
    layers: int  # how many such layers the target set has


@dataclass
class Row:
    method: str
    timed: int
    seconds: float
    per_layer_ms: float
    extra_mb: float


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=190, help="attention layers (3072x3072) to time")
    p.add_argument("--sample", type=int, default=5, help="layers timed for the slow (SVD/QR) methods")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured in turn")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--wide", action="store_true", help="also the feed-forward shapes")
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run: 10 layers of 512x512")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    parts = [t.strip() for t in args.threads.split(",") if t.strip()]
    if not parts or not all(t.isdigit() and int(t) > 0 for t in parts):
        p.error(f"--threads must be positive integers, e.g. 1,2 (got {args.threads!r})")
    args.threads = [int(t) for t in parts]
    if not args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods must name some of {','.join(METHODS)} (got {','.join(args.methods) or 'none'})")
    if args.layers < 1 or args.sample < 1 or args.rank < 2:
        p.error(f"--layers and --sample must be >= 1 and --rank >= 2 (loram's minimum); got "
                f"--layers {args.layers} --sample {args.sample} --rank {args.rank}")
    return args


def groups(args: argparse.Namespace) -> list[Group]:
    if args.quick:
        out = [Group("attention (quick)", 512, 512, 10)]
        wide = [Group("ff up (quick)", 2048, 512, 4), Group("ff down (quick)", 512, 2048, 4)]
    else:
        out = [Group("attention to_q/k/v/out", 3072, 3072, args.layers)]
        wide = [Group("ff up (ff.net.0.proj)", 12288, 3072, 38),
                Group("ff down (ff.net.2)", 3072, 12288, 38)]
    return out + (wide if args.wide else [])


def time_method(method: str, group: Group, rank: int, sample: int) -> list[float]:
    """Wall time of `method` on each of k layers (k = all, or `sample` for SLOW methods)."""
    fn = FNS[method]
    k = min(sample, group.layers) if method in SLOW else group.layers
    rng = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    W = torch.empty(group.n, group.m)
    times = []
    for _ in range(k):
        W.normal_(0.0, WEIGHT_STD, generator=rng)  # next layer's weight, not timed
        t0 = time.perf_counter()
        fn(W, rank, SCALE, generator=gen)
        times.append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def _mem_probe(method: str, n: int, m: int, rank: int, threads: int) -> int:
    """In a fresh process: peak RSS growth (bytes) during one call on an n x m layer. Linux only:
    writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM to the current RSS, so the
    import-time peak of torch does not hide the call's peak (ru_maxrss cannot be reset)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    FNS[method](torch.randn(256, 256, generator=gen) * WEIGHT_STD, rank, SCALE, generator=gen)
    W = torch.empty(n, m).normal_(0.0, WEIGHT_STD, generator=gen)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    FNS[method](W, rank, SCALE, generator=gen)
    return max(_status_kib("VmHWM") - before, 0) * 1024


def peak_extra_mb(method: str, group: Group, rank: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=1, maxtasksperchild=1) as pool:
        extra = pool.apply(_mem_probe, (method, group.n, group.m, rank, torch.get_num_threads()))
    return extra / 2**20


def measure(group: Group, rank: int, sample: int, methods: list[str], memory: bool) -> list[Row]:
    rows = []
    for method in methods + [VAR]:
        times = time_method(method, group, rank, sample)
        extra = peak_extra_mb(method, group, rank) if memory and method != VAR else float("nan")
        rows.append(Row(method, len(times), sum(times), 1e3 * statistics.median(times), extra))
        print(f"  {method:<11} {len(times):>4} layers  {sum(times):8.3f} s", file=sys.stderr, flush=True)
    return rows


def table(group: Group, rows: list[Row]) -> str:
    ref = next((r for r in rows if r.method == "loram"), rows[0]).per_layer_ms
    lines = [f"| method | layers timed | measured s | extrapolated s ({group.layers} layers) | "
             f"per-layer ms | peak extra MB | ratio vs {'loram' if any(r.method == 'loram' for r in rows) else rows[0].method} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = "" if r.timed == group.layers else " (extrapolated)"
        mem = "-" if r.extra_mb != r.extra_mb else f"{r.extra_mb:.1f}"  # NaN: not probed
        lines.append(f"| {r.method} | {r.timed} | {r.seconds:.3f} | {r.per_layer_ms * group.layers / 1e3:.2f}"
                     f"{extra} | {r.per_layer_ms:.2f} | {mem} | {r.per_layer_ms / ref:.1f}x |")
    return "\n".join(lines)


def targets(group: Group, rows: list[Row]) -> list[str]:
    by = {r.method: r for r in rows}
    if "loram" not in by:
        return ["- (loram not measured: no targets to check)"]
    loram = by["loram"]
    layer_mb = group.n * group.m * 4 / 2**20
    checks = [(f"loram >= {need:g}x faster than {other}", by[other].per_layer_ms / loram.per_layer_ms, need, "x")
              for other, need in (("pissa_fast", TARGET_FAST), ("pissa", TARGET_FULL)) if other in by]
    out = [f"- {'PASS' if got >= need else 'FAIL'}: {name} (measured {got:.1f}{unit})"
           for name, got, need, unit in checks]
    passes = loram.per_layer_ms / by[VAR].per_layer_ms
    out.append(f"- {'PASS' if passes <= TARGET_VAR else 'FAIL'}: loram <= {TARGET_VAR:g} W.var() passes "
               f"(measured {passes:.2f})")
    if loram.extra_mb != loram.extra_mb:  # not probed at this thread count
        return out
    ok = loram.extra_mb <= layer_mb
    out.append(f"- {'PASS' if ok else 'FAIL'}: loram peak extra memory <= one layer's weight "
               f"({loram.extra_mb:.1f} MB vs {layer_mb:.1f} MB)")
    return out


def header(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"# LoRA init timing: rank {args.rank}, s = {SCALE:g}, torch {torch.__version__}, CPU {cpu}, "
            f"threads {','.join(map(str, args.threads))}\n\n"
            f"- weights: fp32 N(0, {WEIGHT_STD}^2), one buffer per shape refilled before each layer (RNG not timed)\n"
            f"- {', '.join(sorted(SLOW & set(args.methods))) or '(none)'}: timed on {args.sample} layer(s) per shape and EXTRAPOLATED linearly; "
            "the others on every layer\n"
            "- one untimed warm-up call per method; wall time of the init call only; per-layer ms = median\n"
            "- peak extra MB: peak RSS growth (VmHWM) during one call, fresh process per (method, shape)\n"
            "- ratio vs loram: per-layer time / loram's per-layer time\n"
            "- lora_sb / lora_ga / lora_one: their per-layer math only (randomized SVD of a random n x m gradient; lora_sb "
            "takes its sign first); their gradient pass over the data is not in this number\n"
            "- eva: its per-layer math only: the random n x m buffer as n input rows folded into the m x m moments "
            "(one hook call), then the exact eigendecomposition of the m x m statistic; the activation pass's "
            "forwards are not in this number\n"
            "- corda_ipm: its per-layer math only: the buffer as the weight and as n input rows (moments), the "
            "covariance, one m x m inverse (damping) and the full SVD of W C'; the pass is not in this number")


def main(argv=None) -> int:
    args = parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    for method in args.methods:  # warm-up: first-call library set-up is not what we time
        FNS[method](torch.randn(256, 256, generator=gen) * WEIGHT_STD, args.rank, SCALE, generator=gen)
    print(header(args))
    for k, threads in enumerate(args.threads):
        torch.set_num_threads(threads)
        for group in groups(args):
            print(f"\n## {group.name}: W {group.n}x{group.m}, {group.layers} layers, {threads} thread(s)\n",
                  flush=True)
            rows = measure(group, args.rank, args.sample, args.methods, memory=k == 0)
            print(table(group, rows))
            note = " (defined for FLUX shapes; informational only in --quick)" if args.quick else ""
            print(f"\nTargets{note}:\n" + "\n".join(targets(group, rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
