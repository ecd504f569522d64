"""The DreamBooth subject of the toy world: a two-tone striped emblem the world never renders.

Orange and purple are outside the world's palette and a diamond is not one of its shapes, so the base
model cannot produce this subject before fine-tuning: subject fidelity starts low and has room to grow.
"""

from __future__ import annotations

import numpy as np

from fluxlora.toy.world import COLORS, SUPERSAMPLE, position_center

TRIGGER = "zxq"  # rare token: the world's captions never contain it
ORANGE = (250, 140, 20)
PURPLE = (120, 40, 160)
HALF = 0.16  # half-extent as a fraction of the image side

# The shipped dataset: five views on different backgrounds and positions.
DATASET = (
    ("blue", "top left"),
    ("green", "center"),
    ("white", "bottom right"),
    ("black", "top right"),
    ("yellow", "bottom left"),
)


def emblem_layers(cy: float, cx: float, res: int, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage (res, res) of the diamond (half-diagonal ``half`` px) and its orange stripes."""
    n = res * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(coords - cy, coords - cx, indexing="ij")
    diamond = (np.abs(x) + np.abs(y)) <= half
    # Four horizontal bands across the diamond; even bands orange, odd bands purple.
    band = np.floor((y + half) / (half / 2.0)).astype(np.int64)
    orange = diamond & (band % 2 == 0)

    def down(m: np.ndarray) -> np.ndarray:
        return m.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)

    return down(diamond), down(orange)


def render_subject(bg: str, pos: str, res: int = 64) -> np.ndarray:
    """The emblem on a solid world background colour, uint8 RGB."""
    cy, cx = position_center(pos, res)
    cover, orange = emblem_layers(cy, cx, res, HALF * res)
    purple = cover - orange
    img = (
        np.array(COLORS[bg], np.float32) * (1.0 - cover)[..., None]
        + np.array(ORANGE, np.float32) * orange[..., None]
        + np.array(PURPLE, np.float32) * purple[..., None]
    )
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def template(res: int = 64, phase: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Reference template for the fidelity metric: RGB float (k, k, 3) and coverage mask (k, k);
    ``phase`` shifts the emblem by a sub-pixel amount inside the k x k window."""
    k = int(np.ceil(2 * HALF * res)) + 2
    cover, orange = emblem_layers(k / 2.0 + phase[0], k / 2.0 + phase[1], k, HALF * res)
    rgb = np.array(ORANGE, np.float32) * orange[..., None] + np.array(PURPLE, np.float32) * (
        cover - orange
    )[..., None]
    rgb = rgb / np.maximum(cover, 1e-6)[..., None]
    return rgb, cover


def subject_caption(bg: str, pos: str) -> str:
    return f"a {TRIGGER} emblem on a {bg} background, {pos}"




# Held-out views for the validation loss (data.validation.dir of the toy config): backgrounds and
# positions of neither the training views nor the toy evaluator's prompts.
VALIDATION = (("magenta", "top"), ("red", "right"), ("cyan", "bottom"))


def _write_views(out, views, res: int):
    """NN.png + NN.txt for each (background, position) view; returns the folder."""
    from pathlib import Path

    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (bg, pos) in enumerate(views):
        Image.fromarray(render_subject(bg, pos, res)).save(out / f"{i:02d}.png")
        (out / f"{i:02d}.txt").write_text(subject_caption(bg, pos) + "\n", encoding="utf-8")
    return out


def write_validation(out, res: int = 64) -> None:
    """Write the held-out validation views: NN.png + NN.txt."""
    _write_views(out, VALIDATION, res)


def write_dataset(out, res: int = 64) -> None:
    """Write the shipped subject dataset: NN.png + NN.txt per view, and the reference template."""
    from PIL import Image

    out = _write_views(out, DATASET, res)
    rgb, cover = template(res)
    rgba = np.concatenate([rgb, cover[..., None] * 255.0], axis=-1)
    Image.fromarray(np.clip(np.rint(rgba), 0, 255).astype(np.uint8), "RGBA").save(out.parent / "toy_subject_template.png")
