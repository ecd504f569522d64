"""Fixture builders shared by the fluxlora.data tests: every image is generated with PIL into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fluxlora.data import scan_folder

PROMPT = "a photo of sks dog"


def noise(size=(64, 48), seed=0) -> Image.Image:
    # Random pixels, so no two fixtures are accidental duplicates of each other.
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def scan(folder: Path, prompt: str | None = PROMPT, **kw):
    samples, lines = scan_folder(folder, prompt, **kw)
    return {s.path.name: s for s in samples}, lines


def lines_for(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if name in line]
