"""Aspect-ratio buckets: the training size of each image, and the order of the batches over the buckets.

An image goes, for every training resolution R, to the bucket of about R^2 pixels whose aspect ratio is
closest to its own (sides multiples of ``data.bucket_step``); with buckets off, to the R x R square. A batch
never mixes buckets, and the batch order depends only on (seed, epoch): identical across arms and
reproduced by ``--resume``. The rules are written out in docs/data_handling.md ("Buckets").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MAX_ASPECT = 4.0  # longer / shorter side of the most elongated bucket (data.MAX_ASPECT refuses beyond it)
_SHOWN = 3  # image names spelled out per bucket in a warning


def sizes_for(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Every bucket (width, height) of at most resolution^2 pixels: for each width that is a multiple of
    ``step``, the tallest height that is one too, kept when the aspect ratio is within ``max_aspect``."""
    area, out = resolution * resolution, []
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = (area // w) // step * step
        if h >= step and max(w, h) <= max_aspect * min(w, h):
            out.append((w, h))
    if not out:
        raise ValueError(f"no bucket of about {resolution}^2 px has sides that are multiples of {step}")
    return out


def closest(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate whose aspect ratio is closest to ``size``'s (in log ratio); on a tie the larger one."""
    aspect = math.log(size[0] / size[1])
    return min(candidates, key=lambda c: (abs(math.log(c[0] / c[1]) - aspect), -c[0] * c[1], c))


@dataclass(frozen=True)
class Layout:
    """Which samples train at which size: ``sizes[b]`` (width, height) in px holds ``members[b]``."""

    sizes: tuple[tuple[int, int], ...]
    members: tuple[tuple[int, ...], ...]  # sample indices; an image once per bucket

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(m) for m in self.members)

    def table(self) -> list[str]:
        """One line per bucket: size, aspect and image count."""
        return [f"  {w}x{h}  (aspect {w / h:.2f})  {len(m)} image{'s' * (len(m) != 1)}"
                for (w, h), m in zip(self.sizes, self.members)]

    def warnings(self, names: list[str], batch_size: int) -> list[str]:
        """A line for every bucket with fewer images than a batch: its batches repeat its images."""
        lines = []
        for (w, h), m in zip(self.sizes, self.members):
            if len(m) < batch_size:
                shown = ", ".join(names[i] for i in m[:_SHOWN]) + (", ..." if len(m) > _SHOWN else "")
                lines.append(f"bucket {w}x{h} holds {len(m)} image(s) ({shown}), fewer than train.batch_size "
                             f"{batch_size}: its batches repeat them -> fix: raise data.bucket_step (fewer, "
                             "wider buckets), crop those images closer to the others' shape, or lower "
                             "train.batch_size")
        return lines


def layout(image_sizes: list[tuple[int, int]], resolutions: list[int], step: int, bucketed: bool) -> Layout:
    """Each image's bucket at every resolution (buckets off: the R x R square), buckets sorted by resolution
    then aspect ratio, members in sample order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for r in resolutions:
        candidates = sizes_for(r, step) if bucketed else [(r, r)]
        for i, size in enumerate(image_sizes):
            members = groups.setdefault(closest(size, candidates), [])
            if i not in members:
                members.append(i)
    order = sorted(groups, key=lambda s: (s[0] * s[1], s[0] / s[1]))
    return Layout(tuple(order), tuple(tuple(groups[s]) for s in order))


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """Data order of one epoch: a permutation that depends only on (seed, epoch) - identical per arm."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def stream_rows(n: int, micro: int, batch_size: int, repeats: int, seed: int) -> list[int]:
    """Positions (0..n-1) of micro-batch ``micro`` in the endless stream of epochs over one bucket of n
    images, each ``repeats`` times per epoch; a batch may straddle two epochs."""
    size = n * repeats
    return [int(epoch_order(size, k // size, seed)[k % size]) % n
            for k in range(micro * batch_size, (micro + 1) * batch_size)]


@functools.lru_cache(maxsize=4)
def epoch_batches(counts: tuple[int, ...], batch_size: int, repeats: int, seed: int,
                  epoch: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Every (bucket, positions) batch of one epoch over several buckets: each bucket's images x repeats
    shuffled and cut into batches (the last one filled up from the start of the same shuffle), then the
    batches of all buckets shuffled together."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for b, n in enumerate(counts):
        order = (torch.randperm(n * repeats, generator=g) % n).tolist()
        chunks = math.ceil(len(order) / batch_size)
        cycled = order * math.ceil(chunks * batch_size / len(order))
        batches += [(b, tuple(cycled[i * batch_size:(i + 1) * batch_size])) for i in range(chunks)]
    return tuple(batches[i] for i in torch.randperm(len(batches), generator=g).tolist())


def batches_per_epoch(counts: tuple[int, ...], batch_size: int, repeats: int) -> int:
    return sum(math.ceil(n * repeats / batch_size) for n in counts)


def micro_rows(counts: tuple[int, ...], micro: int, batch_size: int, repeats: int, seed: int) -> tuple[int, list[int]]:
    """(bucket, positions in it) of micro-batch ``micro``. One bucket: the endless stream (a square run's
    order is unchanged by buckets); several: epoch by epoch, ``epoch_batches``."""
    if len(counts) == 1:
        return 0, stream_rows(counts[0], micro, batch_size, repeats, seed)
    per = batches_per_epoch(counts, batch_size, repeats)
    bucket, rows = epoch_batches(counts, batch_size, repeats, seed, micro // per)[micro % per]
    return bucket, list(rows)


def default_step(resolutions: list[int], multiple: int) -> int:
    """64 px, the usual bucket step, for sides of 512 and up; halved while it exceeds 1/8 of the smallest
    side, but never below the family's granularity ``multiple``."""
    step = 64
    while step > multiple and step * 8 > min(resolutions):
        step //= 2
    return max(step, multiple)


def for_run(m, d, image_sizes: list[tuple[int, int]]) -> Layout:
    """The layout of a run's instance images (``m``, ``d``: the model and data sections); data.buckets None
    means on for every model but the toy one (whose world is square)."""
    from fluxlora import families, modelpath

    bucketed = d.buckets if d.buckets is not None else not modelpath.is_toy(m.path)
    step = d.bucket_step or default_step(d.resolutions, families.SPECS[m.family].pixel_multiple)
    return layout(image_sizes, d.resolutions, step, bucketed)


def check_step(layout_: Layout, multiple: int) -> None:
    """Every bucket side must be a multiple of the model's pixel granularity (families' pixel_multiple)."""
    from fluxlora.errors import DataError

    bad = [f"{w}x{h}" for w, h in layout_.sizes if w % multiple or h % multiple]
    if bad:
        raise DataError(f"training sizes {', '.join(bad)} are not multiples of this model's {multiple} px latent "
                        f"granularity -> fix: set data.bucket_step and data.resolution to multiples of {multiple}")


def first_images(members, batches: int, batch_size: int, repeats: int, seed: int) -> list[int]:
    """The sample indices of the first ``batches`` micro-batches (``members``: each bucket's samples)."""
    counts, out = tuple(len(m) for m in members), []
    for micro in range(batches):
        b, rows = micro_rows(counts, micro, batch_size, repeats, seed)
        out += [members[b][r] for r in rows]
    return out
