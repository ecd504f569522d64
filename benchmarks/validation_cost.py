"""What the held-out validation loss costs on the toy config, as a share of an arm's wall time.

    python benchmarks/validation_cost.py [--config train_configs/toy_subject.yaml] [--repeats 10] [--quick]

Prepares the config's base once (with its data.validation), then times, in one process: building the
validation set (inside `prepare`, measured as prepare with validation minus prepare without), one
`validation.evaluate` call on the adapted model (median of --repeats), and one arm (lora) trained with
the config's steps and sample schedule but validation off. The set is built once per run for all its
arms, so the share is (build + arms x evaluations per arm x evaluate) / (arms x arm wall time); target
<= 10%.
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


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    from fluxlora import adapters, validation
    from fluxlora.config import load_config
    from fluxlora.prepare import prepare
    from fluxlora.runner import run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/toy_subject.yaml")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="20 training steps, 2 repeats, 2 sampling steps (CI keeps "
                    "it working)")
    args = ap.parse_args()
    cfg = load_config(args.config, ["sample.steps=2"] if args.quick else [])
    steps = 20 if args.quick else cfg.train.steps
    cpu, quiet = torch.device("cpu"), (lambda m: None)
    off = cfg.model_copy(deep=True)
    off.data.validation = type(cfg.data.validation)()
    prepare(off, cpu, warn=quiet, evaluate=False)  # warm-up: first imports and file reads are not validation's
    with_val, t_with = timed(lambda: prepare(cfg, cpu, warn=quiet, evaluate=False))
    _, t_without = timed(lambda: prepare(off, cpu, warn=quiet, evaluate=False))
    _, t_ref = timed(lambda: validation.reference(with_val))
    model = with_val.model
    targets = adapters.find_targets(model, with_val.family.target_presets[cfg.adapter.targets], blocks_only=True)
    adapters.inject(model, "lora", cfg.adapter.rank, 1.0, targets)
    evals = [timed(lambda: validation.evaluate(with_val, model))[1] for _ in range(2 if args.quick else args.repeats)]
    per_eval = statistics.median(evals)
    n_evals = len({0, steps} | set(range(cfg.sample.every, steps + 1, cfg.sample.every or steps)))
    with tempfile.TemporaryDirectory() as d:
        off.output_dir, off.name = d, "cost"
        off.adapter.init, off.train.steps = "lora", steps
        (summary,) = run(off, warn=quiet)
    wall, arms = summary["wall_seconds"], len(cfg.adapter.arms)
    build = max(t_with - t_without, 0.0) + t_ref
    share = (build + arms * n_evals * per_eval) / (arms * wall)  # the set is built once per run, for every arm
    vs = with_val.validation
    print(f"config {args.config}: {vs.n_subject} held-out views, {len(vs.latents) - vs.n_subject} prior prompts, "
          f"{len(vs.levels)} levels; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| measure | seconds |\n|---|---:|")
    print(f"| build (prepare with - without validation {t_with:.2f} - {t_without:.2f}, + base reference "
          f"{t_ref:.3f}) | {build:.3f} |")
    print(f"| one evaluate (median of {len(evals)}) | {per_eval:.4f} |")
    print(f"| evaluations per arm ({steps} steps, sample.every {cfg.sample.every}) | {n_evals} |")
    print(f"| one arm's wall time without validation (lora) | {wall:.2f} |")
    print(f"\nvalidation cost: {100 * share:.1f}% of the run's training wall time ({arms} arms; target <= 10%)")


if __name__ == "__main__":
    main()
