"""Per-step time of the training loop vs a bare forward+backward+optimizer step of the same model.

    python benchmarks/step_time.py [--steps 50] [--resolution 64] [--rank 8] [--model tiny|toy]

The loop's numbers come from its own metrics.jsonl: the median `step_time` (batch assembly, loss,
backward, clipping, optimizer) and the wall time between consecutive records (adds logging, status
and progress-bar work). The bare step reuses one fixed batch and calls the model directly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_step_time(model_path: str, resolution: int, rank: int, steps: int) -> float:
    from fluxlora import adapters, modelpath
    from fluxlora.families import flow
    from fluxlora.families.flux import FAMILY as flux

    pipe = modelpath.load_base(flux, model_path, "fp32", None, "none")
    model = pipe.transformer
    targets = adapters.find_targets(model, flux.target_presets["attn"])
    adapters.inject(model, "lora", rank, 1.0, targets)
    model.train()
    opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-4)
    c, h, w = flux.latent_shape(pipe, resolution)
    x0 = flux.pack(torch.randn(1, c, h, w))
    text = flux.encode_prompts(pipe, ["a zxq emblem on a red background, center"],
                               modelpath.max_sequence_length(flux, model_path, None))
    cond = flux.condition(text, (h, w), 1.0)
    times = []
    for _ in range(steps + 5):
        t0 = time.perf_counter()
        sig = torch.rand(1)
        noise = torch.randn_like(x0)
        xt, target = flow.noisy(x0, noise, sig)
        pred = flux.predict(model, xt, sig, cond)
        loss = ((pred - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:])


def loop_times(model_path: str, resolution: int, rank: int, steps: int, tmp: Path) -> tuple[float, float]:
    from fluxlora.config import parse_config
    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run
    from fluxlora.toy.subject import write_dataset

    write_dataset(tmp / "data" / "subject", resolution)
    cfg = parse_config({
        "name": "bench", "output_dir": str(tmp / "runs"), "model": {"path": model_path},
        "data": {"instance_dir": str(tmp / "data" / "subject"), "resolution": resolution},
        "adapter": {"init": "lora", "rank": rank},
        "train": {"steps": steps, "checkpoint_every": 0, "lr": 1.0e-4},
        "sample": {"every": 0, "steps": 2, "seeds": [0]},
    })
    run(cfg, warn=lambda m: None)
    recs = [r for r in GroupDir(tmp / "runs" / "bench").arm("lora").metrics() if "step_time" in r]
    inner = statistics.median(r["step_time"] for r in recs[5:])
    gaps = [b["time"] - a["time"] for a, b in zip(recs[5:], recs[6:])]
    return inner, statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--model", default="tiny", help="'tiny' (random tiny FLUX built here) or 'toy'")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model
        if model == "tiny":
            from fluxlora.toy.tiny import build_tiny_flux

            model = str(build_tiny_flux(tmp / "tiny"))
        inner, wall = loop_times(model, args.resolution, args.rank, args.steps, tmp)
        bare = bare_step_time(model, args.resolution, args.rank, args.steps)
    print(f"model={args.model} resolution={args.resolution} rank={args.rank} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    print("| measure | s/step | vs bare |\n|---|---:|---:|")
    print(f"| bare forward+backward+AdamW | {bare:.4f} | 1.00x |")
    print(f"| loop step (metrics step_time, median) | {inner:.4f} | {inner / bare:.2f}x |")
    print(f"| loop wall between steps (median) | {wall:.4f} | {wall / bare:.2f}x |")
    print(f"loop overhead: {100 * (wall / bare - 1):+.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
