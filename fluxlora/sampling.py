"""Fixed-seed sample grids: the same prompts, seeds and CPU-generator noise for every arm and step."""

from __future__ import annotations

import os
import shutil

from PIL import Image, ImageDraw

from fluxlora.rundir import ArmDir, step_name, write_json

LABEL_H = 12


def labelled_grid(images: list[list[Image.Image]], prompts: list[str], seeds: list[int],
                  header: str) -> Image.Image:
    """Rows = prompts, columns = seeds; a header line and a short label under each row."""
    w, h = images[0][0].size
    cols, rows = len(seeds), len(prompts)
    grid = Image.new("RGB", (cols * w, LABEL_H + rows * (h + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 0), header, fill="black")
    for r, row in enumerate(images):
        y = LABEL_H + r * (h + LABEL_H)
        for c, img in enumerate(row):
            grid.paste(img, (c * w, y))
        draw.text((2, y + h), prompts[r][: max(8, cols * w // 6)], fill="black")
    return grid


def write_samples(arm: ArmDir, step: int, images: list[list[Image.Image]], prompts: list[str],
                  seeds: list[int], settings: dict) -> None:
    """samples/step-NNNNNN/{NN.png, grid.png, meta.json}, written as a temp folder then renamed."""
    final = arm.samples_dir / step_name(step)
    tmp = arm.samples_dir / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files = []
        for r, row in enumerate(images):
            for c, img in enumerate(row):
                name = f"{r * len(seeds) + c:02d}.png"
                img.save(tmp / name)
                files.append({"file": name, "prompt": prompts[r], "seed": seeds[c]})
        labelled_grid(images, prompts, seeds, f"{arm.name}  step {step}").save(tmp / "grid.png")
        write_json(tmp / "meta.json", {"arm": arm.name, "step": step, "images": files, **settings})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial step folder (a reader never sees one anyway)
        raise
