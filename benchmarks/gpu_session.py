"""Every GPU measurement issue 22 still needs, as one script for a short lent GPU session: the most wanted
first, each with its own time cap, each result written to OUT as soon as it exists (a step that fails or
runs out of time is logged and the next one starts).

    python benchmarks/gpu_session.py --out $OUT [--budget 540]     # on the GPU machine
    python benchmarks/gpu_session.py --tiny --out /tmp/gs          # CPU rehearsal of the same steps

Steps (issue 22 point: script):
  1. quantized transformer step, int8 and nf4 at 1024 px, checkpointing on (2):   flux_full_gpu.py
  2. `fluxlora train` end to end, int8, 3 arms, samples, checkpoint, export (1):  flux_trainer_gpu.py
  3. block swap: peak memory and s/it for N in {0, half, all} (6):                block_swap.py
  4. where the bf16 step time goes, checkpointing off, 1024 px (2):               flux_full_gpu.py --profile
OUT gets <step>.log (stdout + stderr) and <step>.jsonl where the script writes one, plus summary.md; the
pipeline and run folders go to --work, outside OUT.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(out: Path, work: Path, tiny: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the budget) in priority order."""
    t = ["--tiny"] if tiny else []
    py = sys.executable
    quick = ["--steps", "1", "--warmup", "0"] if tiny else ["--steps", "5", "--warmup", "1"]
    return [
        ("quantized_step", [py, "benchmarks/flux_full_gpu.py", *t, "--bases", "int8,nf4", "--methods", "lora,pissa_fast",
                            "--checkpointing", "on", *([] if tiny else ["--resolutions", "1024"]), *quick,
                            "--jsonl", str(out / "quantized_step.jsonl")], 0.25),
        ("trainer_int8", [py, "benchmarks/flux_trainer_gpu.py", *t, "--out", str(work / "trainer"),
                          "--bases", "none" if tiny else "int8", *([] if tiny else ["--steps", "10"]),
                          "--jsonl", str(out / "trainer_int8.jsonl")], 0.45),
        ("block_swap", [py, "benchmarks/block_swap.py", *t, *([] if tiny else ["--steps", "3", "--warmup", "1"])], 0.15),
        ("bf16_profile", [py, "benchmarks/flux_full_gpu.py", *t, "--bases", "full", "--methods", "lora",
                          "--checkpointing", "off", *([] if tiny else ["--resolutions", "1024"]), *quick,
                          "--profile", str(out / "bf16_profile.txt")], 0.15),
    ]


def run_step(name: str, cmd: list[str], cap: float, out: Path) -> str:
    """Run one step under its time cap; its log goes to OUT/<name>.log. Returns its status line."""
    start = time.monotonic()
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=cap).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"stopped at its {cap:.0f} s cap"
    return f"| {name} | {status} | {time.monotonic() - start:.0f} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results folder (the device tool's $OUT)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fluxlora_gpu_work"), help="scratch folder kept out of "
                    "OUT: the 34 GB pipeline and the run folders (reused by a later call on a warm machine)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together (default 540)")
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal: every step in its --tiny mode")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    lines = ["| step | status | s |", "|---|---|---:|"]
    todo = [s for s in steps(args.out, args.work, args.tiny) if not args.only or s[0] in args.only.split(",")]
    for i, (name, cmd, share) in enumerate(todo):
        left = deadline - time.monotonic()
        if left < 20:
            lines.append(f"| {name} | not started: budget spent | 0 |")
            continue
        # its share of what is left: time a faster step did not use goes to the later ones
        lines.append(run_step(name, cmd, left * share / sum(s for _, _, s in todo[i:]), args.out))
        (args.out / "summary.md").write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
