"""Instance-image loading and validation for DreamBooth-style training.

``scan_folder`` is the up-front validation step: every image is opened and fully decoded before any model
loads, so a bad file costs one warning line now instead of a crash hours into training. The behaviour for
each kind of input is tabulated in ``docs/data_handling.md``.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import random
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from fluxlora.datafiles import EXT_FORMATS, IMAGE_EXTS, describe_os_error, list_folder, same_format
from fluxlora import masks
from fluxlora.errors import DataError

# Refuse images above this many pixels before decoding them (64 MPix of RGB is ~200 MB decoded). Lower
# than PIL's own default limit so it is the guard that fires; the global Image.MAX_IMAGE_PIXELS is untouched.
MAX_PIXELS = 64 * 1024 * 1024
# longer/shorter side above this: a square centre crop would keep less than a quarter of the image.
MAX_ASPECT = 4.0
_MAX_LISTED = 20  # file names spelled out in one error message; the rest are counted

# Damaged files surface as any of these depending on the codec plugin that trips over them.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class Sample:
    path: Path
    image: Image.Image  # RGB, EXIF orientation applied
    caption: str
    mask: Image.Image | None = None  # L, the image's size: white = subject (masks.py)


class _Skip(Exception):
    """One file is unusable; the message is the reason, turned into a warning line by the scanner."""


# --------------------------------------------------------------------------------------------- listing


def _check_folder(folder: str | Path) -> Path:
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"data folder does not exist: {root} -> fix: check the folder path in your config")
    if not root.is_dir():
        raise DataError(f"data folder is not a directory: {root} -> fix: point the config at the folder "
                        "that contains the images, not at a single file")
    return root


# --------------------------------------------------------------------------------------------- images


def _check_regular_file(path: Path) -> None:
    """Cheap checks before PIL touches the file (opening a FIFO would block forever)."""
    try:
        st = path.stat()  # follows symlinks, so loops and dangling links fail here
    except OSError as exc:
        raise _Skip(describe_os_error(exc)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise _Skip("not a regular file (device, FIFO or socket)")
    if st.st_size == 0:
        raise _Skip("empty file (0 bytes) -> fix: re-copy or remove it")


def _check_geometry(size: tuple[int, int], min_size: int) -> None:
    """Works on the header size, before decoding; rotation-invariant, so EXIF orientation doesn't matter."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise _Skip(f"too many pixels ({w}x{h} > {MAX_PIXELS} px, possible decompression bomb) -> fix: "
                    "downscale it")
    if min(w, h) < min_size:
        raise _Skip(f"too small ({w}x{h}, shorter side < {min_size} px) -> fix: use a larger image")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise _Skip(f"extreme aspect ratio ({w}x{h}, more than {MAX_ASPECT:g}:1): a square crop would "
                    "discard most of it -> fix: crop it closer to square")


def _from_16bit(img: Image.Image) -> Image.Image:
    # PIL's own convert clips 16-bit values to 255 (all white); rescale 0..65535 onto 0..255 instead.
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8)).convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    # Transparent areas become white rather than PIL's default black (or whatever colour hides under alpha).
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any decoded mode to RGB; returns the image and an optional note for the warning list."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, None
    if mode in _SIXTEEN_BIT_MODES:
        return _from_16bit(img), "16-bit image scaled to 8-bit"
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(img), None
    if mode == "CMYK":
        return img.convert("RGB"), "CMYK converted to RGB without colour management (colours may shift)"
    return img.convert("RGB"), None  # L, 1, P, YCbCr, ...


def _upright(img: Image.Image, notes: list[str]) -> Image.Image:
    # A malformed EXIF block should not cost the picture: keep it as stored and say so.
    try:
        return ImageOps.exif_transpose(img)
    except (*_DECODE_ERRORS, KeyError, TypeError) as exc:
        notes.append(f"EXIF orientation unreadable ({exc}), used as stored")
        return img


def _decode(path: Path, min_size: int, notes: list[str]) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            _check_geometry(img.size, min_size)  # the real bomb guard: header only, nothing decoded yet
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                notes.append(f"animated ({frames} frames), using the first frame only")
            if path.suffix.lower() in EXT_FORMATS and not same_format(img.format, path.suffix):
                notes.append(f"content is {img.format}, extension {path.suffix} says "
                             f"{EXT_FORMATS[path.suffix.lower()]}; used")
            img.load()  # force the full decode so truncation shows up now, not mid-training
            rgb, note = _to_rgb(_upright(img, notes))
            if note:
                notes.append(note)
            return rgb.copy() if rgb is img else rgb  # detach from the file before it closes


def _load_image(path: Path, min_size: int) -> tuple[Image.Image, list[str]]:
    """Decoded RGB image plus notes, or _Skip with the reason."""
    _check_regular_file(path)
    notes: list[str] = []
    try:
        return _decode(path, min_size, notes), notes
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Skip(f"possible decompression bomb ({exc}) -> fix: downscale it") from exc
    except Image.UnidentifiedImageError as exc:
        raise _Skip("not an image (content not recognised despite the extension) -> fix: remove it or "
                    "re-export it as PNG/JPEG") from exc
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.ELOOP, errno.ENOENT):
            raise _Skip(describe_os_error(exc)) from exc
        raise _Skip(f"corrupt or truncated image ({exc}) -> fix: re-copy or re-export it") from exc
    except _DECODE_ERRORS as exc:
        raise _Skip(f"corrupt image ({type(exc).__name__}: {exc}) -> fix: re-copy or re-export it") from exc


def _load_all(paths: list[Path], min_size: int, notes: dict[Path, str]):
    """Decode every image: ([(path, image, pixel digest)], warning lines, skipped paths)."""
    loaded, lines, skipped = [], [], []
    for path in paths:
        try:
            img, found = _load_image(path, min_size)
        except _Skip as skip:
            lines.append(f"{path}: skipped: {skip}")
            skipped.append(path)
            continue
        lines.extend(f"{path}: {note}" for note in ([notes[path]] if path in notes else []) + found)
        loaded.append((path, img, hashlib.sha256(repr(img.size).encode() + img.tobytes()).hexdigest()))
    return loaded, lines, skipped


def _drop_duplicates(loaded, captions: dict[Path, Path]):
    """Of exact pixel duplicates keep the copy that has a usable caption (else the first by name); say which
    was kept and whose caption is used. -> ([(path, image)], warning lines, skipped paths)."""
    groups: dict[str, list] = {}
    for path, img, digest in loaded:
        groups.setdefault(digest, []).append((path, img))
    kept, lines, skipped = [], [], []
    for members in groups.values():
        captioned = [m for m in members if _caption_of(m[0], captions)[0] is not None]
        keep = (captioned or members)[0]
        kept.append(keep)
        why = "it has a caption file, which is used" if captioned else "the first by name; no copy has a caption"
        for path, _ in members:
            if path != keep[0]:
                lines.append(f"{path}: skipped: exact duplicate of {keep[0].name} (kept {keep[0].name}: {why})")
                skipped.append(path)
    order = {path: i for i, (path, _, _) in enumerate(loaded)}
    kept.sort(key=lambda m: order[m[0]])
    return kept, lines, skipped


# --------------------------------------------------------------------------------------------- captions


def _decode_caption(raw: bytes) -> str:
    # UTF-32 is tested first because its little-endian BOM starts with the UTF-16 one.
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        text = raw.decode("utf-32")
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16")
    else:
        text = raw.decode("utf-8-sig")
    if "\x00" in text:  # typically UTF-16 saved without a BOM: "valid" UTF-8 full of NULs
        raise ValueError("contains NUL bytes")
    return text.strip()


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption, None) when usable, else (None, why it is not)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"caption unreadable: {describe_os_error(exc)}"
    try:
        text = _decode_caption(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"caption is not UTF-8/UTF-16 text ({exc}) -> fix: save it as UTF-8"
    if not text:
        return None, "caption file is empty"
    return text, None


def _caption_of(image: Path, captions: dict[Path, Path]) -> tuple[str | None, str | None]:
    cap_path = captions.get(image.with_suffix(""))
    return _read_caption(cap_path) if cap_path else (None, None)


def _attach_captions(loaded: list[tuple[Path, Image.Image]], captions: dict[str, Path],
                     default: str | None) -> tuple[list[Sample], list[str], list[str]]:
    """Samples, warning lines, and the images left without any caption (only when default is None)."""
    samples: list[Sample] = []
    lines: list[str] = []
    missing: list[str] = []
    for path, img in loaded:
        text, problem = _caption_of(path, captions)
        cap_path = captions.get(path.with_suffix(""))
        if text is None and default is None:
            missing.append(f"{path.name} ({problem})" if problem else path.name)
            continue
        if problem:
            lines.append(f"{cap_path}: {problem}; using data.instance_prompt instead")
        samples.append(Sample(path=path, image=img, caption=text if text is not None else default))
    return samples, lines, missing


# --------------------------------------------------------------------------------------------- public


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    extra = len(items) - _MAX_LISTED
    return shown + (f", ... and {extra} more" if extra > 0 else "")


def _scan(folder: str | Path, default_prompt: str | None, min_size: int, recursive: bool, alpha_mask: bool = False):
    """(samples, warning lines, every file not used)."""
    root = _check_folder(folder)
    # A blank instance prompt is no prompt: it must not silently become the caption of every image.
    default = default_prompt.strip() if default_prompt and default_prompt.strip() else None
    listing = list_folder(root, recursive)
    listed = [f"{p}: skipped: {why}" for p, why in listing.skipped]
    if not listing.images:
        raise DataError(f"no usable images in {root}: no image files (*{', *'.join(IMAGE_EXTS)})"
                        + ("".join(f"\n  {line}" for line in listed[:_MAX_LISTED]))
                        + "\n-> fix: put the instance images in this folder (or set data.recursive=true for "
                          "sub-folders)")
    loaded, lines, bad = _load_all(listing.images, min_size, listing.notes)
    if not loaded:
        raise DataError(f"no usable images in {root}: all {len(listing.images)} image files were skipped:\n  "
                        + "\n  ".join(lines[:_MAX_LISTED])
                        + "\n-> fix: replace or repair the files listed above")
    kept, dup_lines, dups = _drop_duplicates(loaded, listing.captions)
    samples, caption_lines, missing = _attach_captions(kept, listing.captions, default)
    if missing:
        raise DataError(f"images without a usable caption in {root}: {_listed(missing)} -> fix: add a .txt "
                        "caption beside each image (photo.png -> photo.txt) or set data.instance_prompt")
    samples, mask_lines = _attach_masks(samples, listing.masks, alpha_mask)
    orphans = [f"{p}: caption without image, ignored" for p in listing.orphans]
    skipped = [p for p, _ in listing.skipped] + bad + dups
    return samples, listed + lines + dup_lines + caption_lines + mask_lines + orphans, skipped


def _attach_masks(samples: list[Sample], mask_files: dict[Path, Path], alpha: bool) -> tuple[list[Sample], list[str]]:
    out, lines = [], []
    for s in samples:
        mask, problem = masks.load(s.path, mask_files.get(s.path.with_suffix("")), alpha, s.image.size)
        out.append(Sample(s.path, s.image, s.caption, mask) if mask is not None else s)
        lines += [problem] if problem else []
    return out, lines


def scan_folder(folder: str | Path, default_prompt: str | None, *, min_size: int = 32,
                recursive: bool = False, alpha_mask: bool = False) -> tuple[list[Sample], list[str]]:
    """Open and fully check every image in ``folder`` (and its sub-folders with ``recursive``); returns
    (samples, warning lines). Every file is used, used with a note, or named in a line saying why not."""
    samples, lines, _ = _scan(folder, default_prompt, min_size, recursive, alpha_mask)
    return samples, lines


def load_samples(folder: str | Path, default_prompt: str | None, *, min_size: int = 32, recursive: bool = False,
                 alpha_mask: bool = False, warn: Callable[[str], object] = print) -> list[Sample]:
    """scan_folder, reporting each warning line through ``warn``, then "N images used, K skipped"."""
    samples, lines, skipped = _scan(folder, default_prompt, min_size, recursive, alpha_mask)
    for line in lines:
        warn(line)
    names = f": {_listed([p.name for p in skipped])}" if skipped else ""
    masked = sum(s.mask is not None for s in samples)
    warn(f"{folder}: {len(samples)} images used, {len(skipped)} skipped{names}"
         + (f"; {masked} with a loss mask" if masked else ""))
    return samples


def _fit(size: tuple[int, int], target: tuple[int, int], center_crop: bool, rng) -> tuple[tuple[int, int], tuple]:
    """(resized size, crop box): the smallest resize that covers ``target`` (width, height), then the crop,
    centred or at an offset drawn from ``rng`` (the global ``random`` module when None, so the trainer's
    seeding still applies)."""
    (w, h), (tw, th) = size, target
    if tw <= 0 or th <= 0:
        raise ValueError(f"training size must be positive, got {tw}x{th}")
    scale = max(tw / w, th / h)
    new = (max(tw, round(w * scale)), max(th, round(h * scale)))
    spare_x, spare_y = new[0] - tw, new[1] - th
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        source = rng if rng is not None else random
        left, top = source.randint(0, spare_x), source.randint(0, spare_y)
    return new, (left, top, left + tw, top + th)


def _target(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def prepare_image(img: Image.Image, size: int | tuple[int, int], *, center_crop: bool = True,
                  rng: random.Random | None = None) -> torch.Tensor:
    """Resize to cover ``size`` (a square side, or (width, height)) and crop it; float32 [3, H, W] in [-1, 1]."""
    return prepare_pair(img, None, size, center_crop=center_crop, rng=rng)[0]


def prepare_pair(img: Image.Image, mask: Image.Image | None, size: int | tuple[int, int], *,
                 center_crop: bool = True, rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """prepare_image, and the image's mask cut with the same resize and crop ([1, H, W] in [0, 1])."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    size, box = _fit(img.size, _target(size), center_crop, rng)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    arr = np.array(img.crop(box), dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
    pix = torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32) / 127.5 - 1.0
    if mask is None:
        return pix, None
    if size != mask.size:  # area average when shrinking, so thin structures keep their share
        shrink = size[0] < mask.size[0]
        mask = mask.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return pix, masks.to_tensor(mask.crop(box))


def hflip(t: torch.Tensor) -> torch.Tensor:
    """Mirror a [3, H, W] image tensor left-right."""
    return t.flip(-1)
