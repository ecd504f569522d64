"""Per-arm fidelity table (and a step-by-arm picture) from a finished toy-subject run folder.

    python benchmarks/toy_subject_table.py runs/toy_subject [--png docs/toy_subject_steps.png]
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
    ap.add_argument("run_dir")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    group = GroupDir(Path(args.run_dir))
    print(table(group))
    if args.png:
        picture(group, Path(args.png))


if __name__ == "__main__":
    main()
