"""fluxlora: DreamBooth-style LoRA training with the adapter initialization as a first-class axis."""

__version__ = "0.1.0"
