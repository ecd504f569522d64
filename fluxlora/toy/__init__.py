"""The embedded default: a small pretrained FLUX-architecture base model and its toy world."""

from pathlib import Path


def base_model_dir() -> Path:
    """The shipped pipeline directory that ``model.path: toy`` resolves to."""
    return Path(__file__).parent / "assets" / "base"
