"""Masked loss: which pixels of a training image are the subject.

A mask is a grayscale image beside its image (``photo.mask.png`` for ``photo.jpg``; white = subject), or the
image's own alpha channel with ``data.alpha_mask``. It follows every resize, crop and mirror of its image
(``data.prepare_image`` cuts both with one crop box), is averaged down to the latent grid, and weights the
loss per latent element: ``w = m + (1 - m) * data.mask_background_weight``. Each sample's loss is the
weighted mean ``sum(w * err) / sum(w)``, so a small subject does not shrink the loss (and the effective
learning rate) compared with an unmasked image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image



def alpha_of(img: Image.Image) -> Image.Image | None:
    """The alpha channel as an L image, or None when the image has no transparency."""
    if img.mode in ("RGBA", "LA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return None


def as_mask(img: Image.Image) -> Image.Image:
    """Any decoded mask image as 8-bit grayscale (16-bit scaled, colour by luminance, alpha ignored)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return img.point(lambda v: v / 257).convert("L")
    return img.convert("L")


def to_tensor(mask: Image.Image) -> torch.Tensor:
    """[1, H, W] float32 in [0, 1]."""
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(1, mask.height, mask.width).float() / 255


def to_latent_grid(mask: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """[..., 1, H, W] pixel mask -> [..., 1, h, w], each latent cell the mean of the pixels it covers."""
    lead = mask.shape[:-3]
    flat = mask.reshape(-1, 1, *mask.shape[-2:])
    return F.adaptive_avg_pool2d(flat, (latent_h, latent_w)).reshape(*lead, 1, latent_h, latent_w)


def element_weights(mask: torch.Tensor, channels: int, background_weight: float) -> torch.Tensor:
    """[B, 1, h, w] latent-grid mask -> [B, C, h, w] loss weights m + (1 - m) * background_weight."""
    w = mask + (1.0 - mask) * background_weight
    return w.expand(mask.shape[0], channels, *mask.shape[-2:])


def weighted_mean(err: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean over every dim but the first; a sample with no weight at all gives 0."""
    dims = tuple(range(1, err.dim()))
    total = weights.sum(dim=dims)
    return (err * weights).sum(dim=dims) / total.clamp_min(1e-12)


def load(image_path, mask_path, alpha: bool, size: tuple[int, int]) -> tuple[Image.Image | None, str | None]:
    """The mask of one image (its mask file, else its alpha channel with ``alpha``), upright, and a warning
    line when a mask exists but cannot be used (the image then trains unmasked)."""
    from PIL import ImageOps

    source = mask_path if mask_path is not None else (image_path if alpha else None)
    if source is None:
        return None, None
    try:
        with Image.open(source) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            mask = as_mask(upright) if mask_path is not None else alpha_of(upright)
    except Exception as exc:  # noqa: BLE001 - any reader failure: the mask is unusable, the image is not
        return None, f"{source}: mask unreadable ({exc}); the image trains without a mask -> fix: re-export it as PNG"
    if mask is None:
        return None, None  # data.alpha_mask on an image without transparency: nothing to mask
    if mask.size != size:
        return None, (f"{source}: mask is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; the "
                      "image trains without a mask -> fix: save the mask at the image's size")
    return mask, None
