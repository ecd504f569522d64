"""Block swap (train.blocks_to_swap) on a full-size FLUX.1 transformer: peak GPU memory and s/it by N.

    python benchmarks/block_swap.py                 # GPU: N = 0, 28 (half) and 57 (all blocks), bf16
    python benchmarks/block_swap.py --tiny          # a small model on the CPU (keeps the script working)

The model is FLUX.1-dev's architecture with random weights (benchmarks/flux_full_gpu.py builds it on the meta
device and materializes it on the GPU, no download). Each N trains rank-16 LoRA adapters on the attention
projections with cached-embedding-shaped inputs (T5 512 tokens), batch 1, gradient checkpointing on (the
24 GB setting) unless --no-checkpointing, through fluxlora.block_swap exactly as the trainer does: swapping
starts before the adapter exists and the init reads the swapped weights' host copies. Reported: median s/it
of the timed steps, peak ``torch.cuda.max_memory_allocated`` of the steps (weights included), the swapped
weights' size and the bytes moved onto the device per step (measured: 2x the swapped weights, one move for
the forward and one for the backward). docs/block_swap.md has the arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_full_gpu import build, inputs, step, sync, target  # noqa: E402

GIB, MIB = 2**30, 2**20


def counts(n_blocks: int, wanted: str | None) -> list[int]:
    """The N to measure: 0, half the blocks and all of them, or the given list."""
    if wanted:
        return [int(n) for n in wanted.split(",")]
    return [0, n_blocks // 2, n_blocks]


def timed(model, batch: dict, opt, args, device, swap) -> tuple[list[float], int]:
    """Seconds of each timed step and the bytes the swap moved onto the device per step."""
    times, moved = [], 0
    for i in range(args.warmup + args.steps):
        sync(device)
        t0, before = time.perf_counter(), swap.bytes_in
        step(model, batch, opt)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            moved = swap.bytes_in - before
    return times, moved


def measure(model, n: int, args, config, device, dtype) -> dict:
    from fluxlora import adapters, block_swap
    from fluxlora.families import flux

    targets = adapters.find_targets(model, flux.TARGET_PRESETS["attn"])
    with block_swap.swapping(model, n, device) as swap:
        with swap.readable():
            info = adapters.inject(model, "lora", args.rank, 1.0, targets, seed=0)
        try:
            model.train()
            if args.checkpointing:
                model.enable_gradient_checkpointing()
            opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-5)
            batch = inputs(config, args.resolution, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times, moved = timed(model, batch, opt, args, device, swap)
            peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
            swapped = sum(h.numel() * h.element_size() for b in swap.blocks for h in b.host)
        finally:
            model.disable_gradient_checkpointing()
            adapters.remove(model, info)
    return {"n": n, "swapped_mib": swapped / MIB, "moved_mib": moved / MIB, "peak_gib": peak,
            "s_per_it": statistics.median(times)}


def row(r: dict, total: int) -> str:
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    return (f"| {r['n']} | {total - r['n']} | {r['swapped_mib']:.1f} | {r['moved_mib']:.1f} | {peak} | "
            f"{r['s_per_it']:.3f} |")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config on the CPU in fp32")
    ap.add_argument("--blocks", default=None, help="comma-separated N (default: 0, half, all)")
    ap.add_argument("--resolution", type=int, default=None, help="default 1024 (tiny: 64)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 5; tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="default 2 (tiny: 1)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if (where := target(args.tiny)) is None:
        return 2
    device, dtype, config = where
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    model = build(config, device, dtype)
    total = config["num_layers"] + config["num_single_layers"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, {dtype}, {args.resolution} px, gradient checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{total} blocks")
    print("| N swapped | blocks resident | swapped MiB | moved MiB/step | peak GiB | s/it |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in counts(total, args.blocks):
        print(row(measure(model, n, args, config, device, dtype), total), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
