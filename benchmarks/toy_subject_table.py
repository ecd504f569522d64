"""Per-arm fidelity table (and a step-by-arm picture) from finished toy-subject run folders.

    python benchmarks/toy_subject_table.py runs/toy_subject [--png docs/toy_subject_steps.png]
    python benchmarks/toy_subject_table.py runs/toy_subject runs/toy_subject_seed1 ...   (mean +- sd)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxlora.rundir import GroupDir  # noqa: E402

KEYS = ("subject_fidelity", "prompt_fidelity", "prior_accuracy", "prior_drift_px")


def table(group: GroupDir) -> str:
    lines = ["| arm | step | " + " | ".join(KEYS) + " |", "|---|---:|" + "---:|" * len(KEYS)]
    for arm in group.arms():
        for r in arm.metrics():
            if "subject_fidelity" in r:
                vals = " | ".join(f"{r[k]:.3f}" if k != "prior_drift_px" else f"{r[k]:.2f}" for k in KEYS)
                lines.append(f"| {arm.name} | {r['step']} | {vals} |")
    return "\n".join(lines)


def across_runs(groups: list[GroupDir], keys=KEYS) -> str:
    """Mean +- sample sd over runs (e.g. seeds) per arm and sample step."""
    import statistics

    values: dict[tuple[str, int, str], list[float]] = {}
    for group in groups:
        for arm in group.arms():
            for r in arm.metrics():
                if "subject_fidelity" in r:
                    for k in keys:
                        values.setdefault((arm.name, r["step"], k), []).append(r[k])
    rows = sorted({(a, s) for a, s, _ in values}, key=lambda x: ([g.name for g in groups[0].arms()].index(x[0]), x[1]))
    lines = ["| arm | step | n | " + " | ".join(keys) + " |", "|---|---:|---:|" + "---:|" * len(keys)]
    for arm, step in rows:
        cells = []
        for k in keys:
            v = values[(arm, step, k)]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} +- {sd:.3f}")
        lines.append(f"| {arm} | {step} | {len(values[(arm, step, keys[0])])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture(group: GroupDir, out: Path, image: str = "00.png") -> None:
    from PIL import Image, ImageDraw

    arms = group.arms()
    steps = arms[0].sample_steps()
    tile, label = 64 * 2, 70
    canvas = Image.new("RGB", (label + tile * len(steps), 16 + tile * len(arms)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, step in enumerate(steps):
        draw.text((label + c * tile + 4, 2), f"step {step}", fill="black")
    for r, arm in enumerate(arms):
        draw.text((4, 16 + r * tile + tile // 2), arm.name, fill="black")
        for c, step in enumerate(steps):
            img = Image.open(arm.samples_dir / f"step-{step:06d}" / image).resize((tile, tile), Image.NEAREST)
            canvas.paste(img, (label + c * tile, 16 + r * tile))
    canvas.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    groups = [GroupDir(Path(d)) for d in args.run_dirs]
    print(table(groups[0]) if len(groups) == 1 else across_runs(groups))
    if args.png:
        picture(groups[0], Path(args.png))


if __name__ == "__main__":
    main()
