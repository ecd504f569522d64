"""Peak memory of a 3-arm run in one process vs three separate single-arm runs (same config otherwise).

    python benchmarks/multi_arm_memory.py [--config train_configs/toy_subject.yaml] [--steps 20]

Each run is its own `fluxlora train` process; its peak resident memory (ru_maxrss, which on CPU is what
the trainer's "peak MB" reports too) is printed by a small wrapper when it exits. Separate runs started
side by side would need the sum of their peaks; started one after another, the largest one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("lora", "pissa", "loram")
WRAPPER = ("import resource, sys\nfrom fluxlora.cli import main\nrc = main(sys.argv[1:])\n"
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\nsys.exit(rc)")


def train(config: str, out: Path, name: str, arms: list[str], steps: int) -> tuple[float, float]:
    """(peak RSS MB, wall s) of one `fluxlora train` process."""
    overrides = [f"output_dir={out}", f"name={name}", f"train.steps={steps}", "train.checkpoint_every=0",
                 "sample.every=0", f"adapter.init=[{','.join(arms)}]"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, "train", config, *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"run {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    kb = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return kb / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="train_configs/toy_subject.yaml")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        together = train(args.config, out, "together", list(ARMS), args.steps)
        separate = {arm: train(args.config, out, f"only_{arm}", [arm], args.steps) for arm in ARMS}
    peaks = [p for p, _ in separate.values()]
    print("| run | peak RSS MB | wall s |\n|---|---:|---:|")
    print(f"| 3 arms, one process | {together[0]:.0f} | {together[1]:.1f} |")
    for arm, (peak, wall) in separate.items():
        print(f"| {arm} alone | {peak:.0f} | {wall:.1f} |")
    print(f"| 3 separate runs side by side (sum) | {sum(peaks):.0f} | - |")
    print(f"| 3 separate runs one after another (max) | {max(peaks):.0f} | "
          f"{sum(w for _, w in separate.values()):.1f} |")
    print(f"\none process / side-by-side separate = {together[0] / sum(peaks):.2f}; "
          f"one process / largest single run = {together[0] / max(peaks):.2f}")


if __name__ == "__main__":
    main()
