"""Where a base model comes from: ``model.path`` is 'toy' (the shipped base model), a local diffusers
pipeline directory, or a hub id. Families receive the resolved path (they never know about the toy)."""

from __future__ import annotations

import json
from pathlib import Path

from fluxlora.errors import ModelLoadError

TOY = "toy"
TOY_META = "fluxlora_toy.json"  # the toy pipeline's own sampling defaults


def looks_local(path: str) -> bool:
    """A path, not a hub id ("owner/name"): it starts with . / ~ or does not have exactly one slash."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1


def resolve(path: str) -> str:
    """'toy' -> the shipped base model; a local dir stays; anything else must look like a hub id."""
    if path == TOY:
        from fluxlora.toy import base_model_dir

        return str(base_model_dir())
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists():
            raise ModelLoadError(f"model.path {path!r} is a folder but not a diffusers pipeline (no "
                                 "model_index.json) -> fix: point model.path at a pipeline directory")
        return str(p)
    if looks_local(path):
        raise ModelLoadError(f"model.path {path!r} does not exist -> fix: give a local diffusers pipeline "
                             "directory, a hub id like black-forest-labs/FLUX.1-dev, or 'toy'")
    return path


def toy_defaults(path: str) -> dict | None:
    """The sampling defaults a toy pipeline ships (fluxlora_toy.json), or None for any other model."""
    meta = Path(resolve(path)) / TOY_META
    return json.loads(meta.read_text())["sample"] if meta.exists() else None


def is_toy(path: str) -> bool:
    return toy_defaults(path) is not None


def max_sequence_length(family, path: str, configured: int | None) -> int:
    """Text tokens: the config's, else the toy model's own default, else the family's."""
    if configured:
        return configured
    toy = toy_defaults(path)
    return int(toy["max_sequence_length"]) if toy else family.default_max_sequence_length()


def load_base(family, path: str, dtype: str, revision: str | None, quantize: str):
    """The family's pipeline for ``model.path`` (resolved here)."""
    return family.load(resolve(path), dtype, revision, quantize)
