"""Exact detectors for the toy world: what does an image show? No learned model.

Background = the border's median colour; the object's coverage is each pixel's distance from the
background relative to the object's own colour (a soft mask, robust to blur); position from the mask's
centroid; size from its extent; shape by matching the mask against rendered templates of every shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxlora.toy import world

PALETTE = np.array(list(world.COLORS.values()), np.float32)
NAMES = list(world.COLORS)
# Max mask extent (fraction of the side) between the largest small shape (circle, 0.19) and the
# smallest large one (square, 0.255): see world.SIZES and world._inside.
SIZE_SPLIT = 0.225


@dataclass(frozen=True)
class Detection:
    bg: str
    color: str | None
    shape: str | None
    pos: str | None
    size: str | None


def nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    d = np.linalg.norm(PALETTE - rgb[None], axis=1)
    if exclude is not None:
        d[NAMES.index(exclude)] = np.inf
    return NAMES[int(np.argmin(d))]


def background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)]).astype(np.float32)
    return np.median(border, axis=0)


def coverage(img: np.ndarray, bg_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Soft object mask in [0, 1] and the object's colour (None when nothing stands out)."""
    x = img.astype(np.float32)
    dist = np.linalg.norm(x - bg_rgb, axis=-1)
    flat = dist.ravel()
    top = np.argsort(flat)[-12:]
    if flat[top].mean() < 40.0:  # nothing differs clearly from the background
        return np.zeros_like(dist), None
    obj = np.median(x.reshape(-1, 3)[top], axis=0)
    span = max(float(np.linalg.norm(obj - bg_rgb)), 1.0)
    # Project on the bg -> object direction so other colour noise does not count as object.
    direction = (obj - bg_rgb) / span
    cover = np.clip(((x - bg_rgb) @ direction) / span, 0.0, 1.0)
    cover[cover < 0.25] = 0.0
    return cover, obj


def detect(img: np.ndarray) -> Detection:
    res = img.shape[0]
    bg_rgb = background(img)
    bg = nearest(bg_rgb)
    cover, obj = coverage(img, bg_rgb)
    if obj is None or cover.sum() < 2.0:
        return Detection(bg, None, None, None, None)
    ys, xs = np.nonzero(cover >= 0.5)
    if len(ys) == 0:
        return Detection(bg, nearest(obj, exclude=bg), None, None, None)
    w = cover
    total = w.sum()
    grid = np.arange(res, dtype=np.float32) + 0.5
    cy = float((w.sum(axis=1) * grid).sum() / total)
    cx = float((w.sum(axis=0) * grid).sum() / total)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / res
    size = "small" if extent < SIZE_SPLIT else "large"
    row, col = min(int(cy * 3 / res), 2), min(int(cx * 3 / res), 2)
    return Detection(bg, nearest(obj, exclude=bg), best_shape(cover, cy, cx, size),
                     world.POSITIONS[row * 3 + col], size)


def best_shape(cover: np.ndarray, cy: float, cx: float, size: str) -> str:
    """The shape whose rendered mask (same size, same centroid) overlaps ``cover`` best (soft IoU)."""
    res = cover.shape[0]
    best, best_iou = None, -1.0
    for shape in world.SHAPES:
        t = world.shape_mask(shape, cy, cx, world.SIZES[size] * res, res)
        iou = np.minimum(t, cover).sum() / max(np.maximum(t, cover).sum(), 1e-6)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def accuracy(pairs) -> dict[str, float]:
    """Per-attribute accuracy over (scene, image) pairs."""
    keys = ("bg", "color", "shape", "pos", "size")
    hits = dict.fromkeys(keys, 0)
    n = 0
    for scene, img in pairs:
        d = detect(img)
        n += 1
        for k in keys:
            hits[k] += int(getattr(d, k) == getattr(scene, "bg" if k == "bg" else k))
    return {k: hits[k] / max(n, 1) for k in keys}
