"""Launching a training from the browser: check the uploads and write a dataset + config (the subprocess
and the job table: jobs.py)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fluxlora.config import ConfigError, dump_config, parse_config

MIN_IMAGES, MAX_IMAGES = 3, 20
MAX_IMAGE_BYTES = 20 * 2**20
MAX_UPLOAD_BYTES = 10 * MAX_IMAGE_BYTES  # Gradio's own limit refuses a whole selection: only a hard guard
MAX_IMAGE_PIXELS = 40_000_000
MIN_SIDE = 32
UPLOAD_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TRIGGER_RE = re.compile(r"^[A-Za-z0-9_]{2,32}$")
UPLOADS = ".uploads"  # inside the runs folder; hidden from the browser and never served


class LaunchError(ValueError):
    """A launch form problem, phrased for the user."""


CAPTION_SUFFIX = ".txt"  # a caption uploaded beside its image: same name, .txt
MAX_CAPTION_BYTES = 64 * 1024


def check_caption(path: Path) -> str | None:
    """A problem with one uploaded caption file, or None."""
    if path.stat().st_size > MAX_CAPTION_BYTES:
        return f"{path.name}: a caption over {MAX_CAPTION_BYTES // 1024} kB"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return f"{path.name}: not UTF-8 text (save the caption as UTF-8)"
    return None if text.strip() else f"{path.name}: an empty caption (delete it to use the form's caption)"


def check_file(path: Path) -> str | None:
    return check_caption(path) if path.suffix.lower() == CAPTION_SUFFIX else check_image(path)


def split_upload(paths: list[Path]) -> tuple[list[Path], dict[str, Path]]:
    """The images, and the captions by their stem."""
    captions = {p.stem: p for p in paths if p.suffix.lower() == CAPTION_SUFFIX}
    return [p for p in paths if p.suffix.lower() != CAPTION_SUFFIX], captions


def check_image(path: Path) -> str | None:
    """A problem with one uploaded file, or None if it is a usable image."""
    suffix = path.suffix.lower()
    if suffix not in UPLOAD_TYPES:
        return f"{path.name}: not a PNG/JPEG/WebP file name"
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return f"{path.name}: {size / 2**20:.1f} MB is over the {MAX_IMAGE_BYTES // 2**20} MB limit"
    try:
        with Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
            if w * h > MAX_IMAGE_PIXELS:
                return f"{path.name}: {w}x{h} is over the {MAX_IMAGE_PIXELS // 10**6} MPix limit"
            img.verify()
    except Exception as e:  # PIL raises many types for damaged or foreign content
        return f"{path.name}: not a readable image ({type(e).__name__})"
    if fmt not in UPLOAD_TYPES.values():
        return f"{path.name}: content is {fmt}, not PNG/JPEG/WebP"
    if min(w, h) < MIN_SIDE:
        return f"{path.name}: {w}x{h} is smaller than {MIN_SIDE} px on a side"
    return None


@dataclass
class LaunchForm:
    name: str
    images: list[Path]
    trigger: str
    prompt: str = "a photo of {trigger}"
    arms: list[str] = field(default_factory=lambda: ["lora", "pissa", "loram"])
    rank: int = 8
    steps: int = 400
    resolution: int = 512
    model_path: str = "toy"
    lr: float = 1e-3


def check_form(form: LaunchForm, runs: Path) -> list[str]:
    problems = []
    if not NAME_RE.match(form.name or ""):
        problems.append("run name: use 1-64 letters, digits, '-' or '_' (starting with a letter or digit)")
    elif (runs / form.name).exists():
        problems.append(f"run name: {form.name!r} already exists in {runs} -> pick another name")
    if not TRIGGER_RE.match(form.trigger or ""):
        problems.append("trigger word: 2-32 letters, digits or '_' (a rare token such as 'zxq')")
    if "{trigger}" not in form.prompt:
        problems.append("caption: must contain {trigger} where the trigger word goes")
    images, captions = split_upload(form.images)
    if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
        problems.append(f"images: upload {MIN_IMAGES}-{MAX_IMAGES} subject images (got {len(images)})")
    problems += [p for p in map(check_file, form.images) if p]
    stems = {p.stem for p in images}
    problems += [f"{c.name}: no image named {stem}.* in the upload (a caption goes with the image of the same "
                 "name)" for stem, c in captions.items() if stem not in stems]
    if not form.arms:
        problems.append("arms: pick at least one init method")
    return problems


def build_config(form: LaunchForm, runs: Path, dataset: Path) -> dict:
    prompt = form.prompt.replace("{trigger}", form.trigger)
    return {
        "name": form.name, "output_dir": str(runs.resolve()),
        "model": {"family": "flux", "path": form.model_path},
        "data": {"instance_dir": str(dataset.resolve()), "instance_prompt": prompt, "trigger": form.trigger,
                 "resolution": form.resolution},
        "adapter": {"init": list(form.arms), "rank": form.rank},
        "train": {"steps": form.steps, "lr": form.lr, "checkpoint_every": max(1, form.steps // 2)},
        "sample": {"every": max(1, form.steps // 4), "prompts": [prompt], "seeds": [0, 1]},
    }


def stage(form: LaunchForm, runs: Path) -> Path:
    """Check the form, copy the images into runs/.uploads/<name>/images and write the config there.
    Returns the config path. Raises LaunchError listing every problem; nothing is left behind then."""
    problems = check_form(form, runs)
    if problems:
        raise LaunchError("\n".join(problems))
    folder = runs / UPLOADS / form.name
    shutil.rmtree(folder, ignore_errors=True)
    dataset = folder / "images"
    dataset.mkdir(parents=True)
    try:
        images, captions = split_upload(form.images)
        for i, src in enumerate(images):
            shutil.copyfile(src, dataset / f"{i:02d}{src.suffix.lower()}")
            if src.stem in captions:  # the data loader reads the same-name .txt as this image's caption
                shutil.copyfile(captions[src.stem], dataset / f"{i:02d}{CAPTION_SUFFIX}")
        cfg = parse_config(build_config(form, runs, dataset), source="web UI launch form")
    except (ConfigError, OSError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise LaunchError(str(e)) from e
    path = folder / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


PROGRESS_LINE = re.compile(r"^\s*([^:|]{1,60}):\s+\d+%\|")  # a tqdm redraw: "lora:  50%|#####  | 200/400 ..."


def collapse_progress(lines: list[str]) -> list[str]:
    """Keep only the last of consecutive redraws of the same progress bar (the log holds every redraw)."""
    out: list[str] = []
    for line in lines:
        m = PROGRESS_LINE.match(line)
        if m and out and (prev := PROGRESS_LINE.match(out[-1])) and prev.group(1) == m.group(1):
            out[-1] = line
        else:
            out.append(line)
    return out


def screen_uploads(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Split an upload into usable images and one problem per refused file (a bad file is refused alone)."""
    kept, problems = [], []
    for path in paths:
        problem = check_file(path)
        (problems.append(problem) if problem else kept.append(path))
    return kept, problems
