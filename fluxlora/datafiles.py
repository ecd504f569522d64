"""Which files of a data folder are images, which are captions, and why every other one is not used.

Every entry is accounted for: an image candidate (by extension, or by its content when the extension is
unknown), a caption (``.txt``), or skipped with a reason (hidden file, sub-folder without data.recursive,
not a regular file, unsupported content). Nothing is decoded here beyond a header read for sniffing; a FIFO
or device is never opened. docs/data_handling.md tabulates the outcome for each kind of input.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fluxlora.errors import DataError

# Extension -> the PIL format it promises. MPO is how PIL names many phone JPEGs (multi-picture JPEG).
EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
               ".tif": "TIFF", ".tiff": "TIFF"}
IMAGE_EXTS = tuple(EXT_FORMATS)
READABLE_FORMATS = set(EXT_FORMATS.values()) | {"MPO"}
CAPTION_EXT = ".txt"
MASK_TAG = ".mask"  # photo.mask.png is the loss mask of photo.<ext> (masks.py)


@dataclass
class Listing:
    images: list[Path] = field(default_factory=list)  # candidates, sorted by path relative to the root
    captions: dict[Path, Path] = field(default_factory=dict)  # image path without suffix -> caption file
    notes: dict[Path, str] = field(default_factory=dict)  # per image: why it is used despite its name
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    orphans: list[Path] = field(default_factory=list)  # captions without an image
    masks: dict[Path, Path] = field(default_factory=dict)  # image path without suffix -> its mask file


def same_format(found: str | None, suffix: str) -> bool:
    promised = EXT_FORMATS.get(suffix.lower())
    return found == promised or {found, promised} <= {"JPEG", "MPO"}


def sniff(path: Path) -> str | None:
    """The image format PIL recognises in the file's header, or None (nothing is decoded)."""
    try:
        with Image.open(path) as img:
            return img.format
    except Exception:  # noqa: BLE001 - any reader failure means "not an image PIL knows"
        return None


def describe_os_error(exc: OSError) -> str:
    """The reason and the fix for an OSError reading a data file."""
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return "permission denied -> fix: make it readable (chmod a+r) or remove it"
    if exc.errno == errno.ELOOP:
        return "symlink loop -> fix: replace the link with the real file"
    if exc.errno == errno.ENOENT:
        return "broken symlink (target missing) -> fix: restore the target or remove the link"
    return f"cannot read file ({exc.strerror or exc}) -> fix: re-copy or remove it"


def _kind(path: Path) -> str:
    """'dir', 'file' or 'other' (FIFO, socket, device), following symlinks; 'broken' when stat fails."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "broken"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"cannot list data folder {folder}: {describe_os_error(exc)}") from exc


def _add_file(out: Listing, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == CAPTION_EXT and _kind(path) == "other":  # a FIFO named like a caption must never be read
        out.skipped.append((path, "not a regular file (device, FIFO or socket)"))
        return
    if suffix == CAPTION_EXT:
        key = path.with_suffix("")
        # An exact ".txt" wins over "FOO.TXT" when a case-sensitive file system holds both.
        if key not in out.captions or path.suffix == CAPTION_EXT:
            out.captions[key] = path
        return
    if suffix in EXT_FORMATS and path.stem.lower().endswith(MASK_TAG):  # photo.mask.png: photo's mask
        out.masks[path.with_name(path.stem[:-len(MASK_TAG)])] = path
        return
    if suffix in EXT_FORMATS:
        out.images.append(path)
        return
    kind = _kind(path)
    found = sniff(path) if kind == "file" else None
    if kind == "other":
        out.skipped.append((path, "not a regular file (device, FIFO or socket)"))
    elif found in READABLE_FORMATS:
        out.images.append(path)
        out.notes[path] = f"content is {found}, extension {path.suffix or '(none)'} says otherwise; used"
    else:
        what = f"extension {path.suffix}" if path.suffix else "no extension"
        out.skipped.append((path, f"not a supported image ({what}; readable: {', '.join(IMAGE_EXTS)})"))


def _walk(out: Listing, folder: Path, recursive: bool, seen: set | None = None) -> None:
    seen = set() if seen is None else seen
    st = folder.stat()
    seen.add((st.st_dev, st.st_ino))  # a directory reached twice (symlink loop) is scanned once
    for path in _entries(folder):
        if path.name.startswith("."):
            out.skipped.append((path, "hidden file (name starts with '.'; e.g. macOS ._ copies, .DS_Store)"))
        elif _kind(path) == "dir":
            st = path.stat()
            if recursive and (st.st_dev, st.st_ino) in seen:
                out.skipped.append((path, "a folder already scanned (symlink loop), not scanned again"))
            elif recursive:
                _walk(out, path, recursive, seen)
            else:
                out.skipped.append((path, "sub-folder (a directory), not scanned -> fix: set data.recursive=true "
                                          "to use the images in it, or move them up"))
        else:
            _add_file(out, path)


def list_folder(root: Path, recursive: bool = False) -> Listing:
    """Every entry of ``root`` (and of its sub-folders with ``recursive``), sorted by relative path."""
    out = Listing()
    _walk(out, root, recursive)
    out.images.sort(key=lambda p: p.relative_to(root).as_posix())
    stems = {p.with_suffix("") for p in out.images}
    out.orphans = [cap for key, cap in sorted(out.captions.items()) if key not in stems]
    for key, mask in sorted(out.masks.items()):
        if key not in stems:
            out.skipped.append((mask, "mask without an image (photo.mask.png needs photo.<ext> beside it)"))
    out.masks = {k: v for k, v in out.masks.items() if k in stems}
    return out
