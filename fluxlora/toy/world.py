"""The toy world: coloured shapes on solid backgrounds, rendered exactly, captioned by a grammar.

Everything is a pure function of a seed, so the training stream, the held-out evaluation set and the
detectors (``detect.py``) agree on what an image *should* contain. Images are rendered at 4x and
box-filtered down, which anti-aliases the edges the same way every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

# Palette shared by objects and backgrounds (an object never has its background's colour).
# Chosen far apart in RGB so nearest-colour detection is unambiguous even on blurry samples.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "cyan": (40, 200, 210),
    "magenta": (210, 50, 200),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")
SIZES = {"small": 0.095, "large": 0.15}  # half-extent as a fraction of the image side
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
SUPERSAMPLE = 4

# Wording variations: the grammar is fixed, the phrasing varies a little (as real captions do).
TEMPLATES = (
    "a {size} {color} {shape} on a {bg} background, {pos}",
    "a {size} {color} {shape}, {pos}, on a {bg} background",
    "{pos}: a {size} {color} {shape} on {bg}",
)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    bg: str
    size: str
    pos: str

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the 3x3 grid cell."""
        i = POSITIONS.index(self.pos)
        return i // 3, i % 3


def position_center(pos: str, res: int) -> tuple[float, float]:
    """Pixel centre (y, x) of a grid cell: cell centres sit at 1/6, 3/6, 5/6 of the side."""
    i = POSITIONS.index(pos)
    return (2 * (i // 3) + 1) * res / 6.0, (2 * (i % 3) + 1) * res / 6.0


def shape_mask(shape: str, cy: float, cx: float, half: float, res: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at (cy, cx), half-extent ``half`` px."""
    n = res * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(coords - cy, coords - cx, indexing="ij")
    inside = _inside(shape, y, x, half)
    cover = inside.reshape(res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(1, 3))
    return cover.astype(np.float32)


def _inside(shape: str, y: np.ndarray, x: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return (y * y + x * x) <= r * r
    if shape == "ring":
        d2 = y * y + x * x
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(y), np.abs(x)) <= 0.85 * r
    if shape == "cross":
        arm = 0.34 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if shape == "triangle":
        # Upward equilateral triangle with circumradius 1.1 r, centroid at the origin.
        R = 1.1 * r
        base = 0.5 * R
        slope = np.sqrt(3.0)
        return (y <= base) & (slope * np.abs(x) <= y + R)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, res: int = 64) -> np.ndarray:
    """Render a scene as uint8 RGB (res, res, 3)."""
    cy, cx = position_center(scene.pos, res)
    cover = shape_mask(scene.shape, cy, cx, SIZES[scene.size] * res, res)[..., None]
    bg = np.array(COLORS[scene.bg], np.float32)
    fg = np.array(COLORS[scene.color], np.float32)
    img = bg * (1.0 - cover) + fg * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_scene(rng: random.Random) -> Scene:
    names = list(COLORS)
    color = rng.choice(names)
    bg = rng.choice([c for c in names if c != color])
    return Scene(rng.choice(SHAPES), color, bg, rng.choice(list(SIZES)), rng.choice(POSITIONS))


def caption(scene: Scene, rng: random.Random | None = None, template: int | None = None) -> str:
    """Caption a scene; ``template`` picks the wording (random from ``rng`` when None)."""
    if template is None:
        template = rng.randrange(len(TEMPLATES)) if rng is not None else 0
    return TEMPLATES[template].format(
        size=scene.size, color=scene.color, shape=scene.shape, bg=scene.bg, pos=scene.pos
    )


def stream(seed: int, res: int = 64):
    """Unbounded deterministic stream of (image uint8 HxWx3, caption, scene) for training."""
    rng = random.Random(seed)
    while True:
        scene = random_scene(rng)
        yield render(scene, res), caption(scene, rng), scene


# The held-out evaluation set: a seed the training stream never uses, canonical wording.
HELDOUT_SEED = 10_000_019


def heldout(n: int = 200) -> list[tuple[Scene, str, int]]:
    """Fixed held-out (scene, prompt, sample seed) triples for evaluating a base model."""
    rng = random.Random(HELDOUT_SEED)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        out.append((scene, caption(scene, template=0), 1000 + i))
    return out
