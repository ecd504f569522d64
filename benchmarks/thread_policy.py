"""Generation beside a running training, before and after the CPU thread policy (fluxlora/threads.py).

    python benchmarks/thread_policy.py [--images 10] [--quick]

What the web UI does when a user clicks Generate while a run it launched trains: the server generates
toy images (20 steps each, the shipped toy base) while a `fluxlora train` subprocess trains the toy
config. Three settings, one after the other:
  alone   generation with every core, nothing beside it (the reference);
  before  both at torch's default (every core each): what happened before the policy;
  after   the policy: the training with every core but one (`--threads`), the generation with 1 thread.
Reported: the wall time of the generation, and the training's median `step_time` while the generation
ran (from its metrics.jsonl, steps whose record time falls inside the generation window).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(n: int, steps: int) -> tuple[float, float, float]:
    """(start, end, seconds) of generating n toy images."""
    from fluxlora import modelpath
    from fluxlora.families.flux import FAMILY as flux

    pipe = modelpath.load_base(flux, "toy", "fp32", None, "none")
    cond = flux.encode_prompts(pipe, ["a large red circle on a white background, center"], 77)
    t0 = time.time()
    for seed in range(n):
        flux.generate(pipe, cond, None, [seed], 64, steps, 3.5, 1.0)
    return t0, time.time(), time.time() - t0


def start_training(tmp: Path, name: str, threads: int | None, warm: int) -> tuple[subprocess.Popen, Path]:
    """The training subprocess, once ``warm`` steps are logged (it is really training)."""
    cmd = [sys.executable, "-m", "fluxlora.cli", "train", str(ROOT / "train_configs/toy_subject.yaml"),
           f"output_dir={tmp}", f"name={name}", "adapter.init=lora", "train.steps=100000", "sample.every=0",
           "train.checkpoint_every=0", "data.validation.prior_prompts=[]", "data.validation.dir=null",
           "sample.steps=2"]  # step-0 samples and the toy evaluator: quick, they are not what is measured
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp / name / "lora" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < warm):
        time.sleep(0.5)
    return proc, metrics


def steps_within(metrics: Path, start: float, end: float) -> float | None:
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [r["step_time"] for r in recs if "step_time" in r and start <= r.get("time", 0) <= end]
    return statistics.median(times) if times else None


def beside_training(tmp: Path, name: str, train_threads: int | None, gen_threads: int, n: int, steps: int):
    proc, metrics = start_training(tmp, name, train_threads, 10 if n > 2 else 2)
    try:
        torch.set_num_threads(gen_threads)
        start, end, seconds = generate(n, steps)
        return seconds, steps_within(metrics, start, end)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> None:
    from fluxlora import threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="2 images of 2 steps (CI keeps the script working)")
    args = ap.parse_args()
    n, steps = (2, 2) if args.quick else (args.images, 20)
    cores = threads.cores()
    print(f"torch {torch.__version__}, {cores} cores; {n} toy images x {steps} steps beside a toy training")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.set_num_threads(cores)
        alone = generate(n, steps)[2]
        before = beside_training(tmp, "before", None, cores, n, steps)
        after = beside_training(tmp, "after", threads.for_launched_training(), threads.for_generation(True), n, steps)
    print("| setting | generation threads | training threads | generation s | training s/step meanwhile |")
    print("|---|---:|---:|---:|---:|")
    print(f"| alone | {cores} | - | {alone:.2f} | - |")
    for label, (gen, step), gt, tt in (("before (torch defaults)", before, cores, cores),
                                       ("after (thread policy)", after, threads.for_generation(True),
                                        threads.for_launched_training())):
        print(f"| {label} | {gt} | {tt} | {gen:.2f} | {'-' if step is None else f'{step:.4f}'} |")


if __name__ == "__main__":
    main()
