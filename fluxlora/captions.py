"""Caption variants for training: tag shuffling (``data.shuffle_tags``, the first ``data.keep_tokens``
comma-separated tags stay in place, e.g. the trigger) and caption dropout (``data.caption_dropout``: a row
trains with the empty caption, the unconditional input, with that probability).

Text embeddings stay cached: every variant is encoded once before training (``data.tag_variants`` shuffled
orders per caption, drawn from the run's seed), and a step only picks indices into that table, drawing from
the training generator, so the arms see the same captions and --resume repeats them exactly. With both
features off nothing is drawn and the data order is exactly as without them."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

EMPTY = ""


def shuffled(caption: str, keep: int, rng: random.Random) -> str:
    """The caption's comma-separated tags with all but the first ``keep`` in a random order."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def variants(caption: str, count: int, keep: int, rng: random.Random) -> list[str]:
    """``count`` orders of the caption's tags, the caption as written first (duplicates are kept, so every
    caption has the same number of variants and each is drawn with the same chance)."""
    return [caption] + [shuffled(caption, keep, rng) for _ in range(count - 1)]


@dataclass
class CaptionTable:
    """The unique texts to encode once, and per caption the table indices of its variants."""

    texts: list[str]
    rows: dict[str, list[int]]  # caption -> indices of its variants (the first: the caption itself)
    empty: int | None  # index of the empty caption (caption dropout), None when dropout is off


def build(captions: list[str], shuffle: bool, count: int, keep: int, dropout: float, seed: int,
          fixed: list[str] = ()) -> CaptionTable:
    """The table for the subject ``captions`` (varied as configured) and ``fixed`` ones (class captions, used
    as written), sorted; with both features off it is exactly the sorted set of all captions."""
    rng = random.Random(seed)
    per = {c: (variants(c, count, keep, rng) if shuffle else [c]) for c in sorted(set(captions))}
    per.update({c: [c] for c in fixed if c not in per})
    texts = sorted({t for vs in per.values() for t in vs} | ({EMPTY} if dropout > 0 else set()))
    index = {t: i for i, t in enumerate(texts)}
    return CaptionTable(texts, {c: [index[t] for t in vs] for c, vs in per.items()},
                        index[EMPTY] if dropout > 0 else None)


def pick(variant_rows: torch.Tensor, rows: torch.Tensor, dropout: float, empty: int | None,
         gen: torch.Generator) -> torch.Tensor:
    """Caption indices of the batch ``rows``: a random variant of each (only when there is more than one),
    then the empty caption with probability ``dropout`` (only when it is on)."""
    if variant_rows.shape[1] > 1:
        col = torch.randint(0, variant_rows.shape[1], (len(rows),), generator=gen)
        out = variant_rows[rows, col]
    else:
        out = variant_rows[rows, 0]
    if dropout > 0:
        drop = torch.rand(len(rows), generator=gen) < dropout
        out = torch.where(drop, torch.full_like(out, empty), out)
    return out
