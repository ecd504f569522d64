"""Checks before anything heavy loads: data folders, model path, output folder. All problems together.

A typo in a path must cost seconds, not the minutes it takes to load a model first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fluxlora import data, methods, validation
from fluxlora.config import ConfigError, Problem, RunConfig
from fluxlora.errors import AdapterError, ModelLoadError


def _problem(where: str, value: str | None, error: Exception, default_fix: str) -> Problem:
    """A user error whose message carries its own "-> fix: ..." as one Problem (else ``default_fix``)."""
    message, sep, fix = str(error).rpartition("-> fix: ")
    return Problem(where, value, message.strip(), fix.strip()) if sep else Problem(where, value, str(error),
                                                                                    default_fix)


def _data_problems(cfg: RunConfig) -> tuple[list[Problem], list[tuple[int, int]]]:
    """Problems of the data folders, and the sizes of the usable subject images (none when the folder fails)."""
    out, sizes = [], []
    try:
        sizes = [s.image.size for s in data.scan_folder(cfg.data.instance_dir, cfg.data.instance_prompt,
                                                        recursive=cfg.data.recursive, alpha_mask=cfg.data.alpha_mask)[0]]
    except data.DataError as e:
        out.append(_problem("data.instance_dir", repr(cfg.data.instance_dir), e,
                            "point it at a folder of usable images"))
    out += _validation_problems(cfg, len(sizes))
    held = cfg.data.validation.holdout
    sizes = validation.split_holdout(sizes, held)[0] if held < len(sizes) else sizes  # the images that train
    class_dir = cfg.data.class_dir
    if class_dir and not cfg.data.num_class_images and not Path(class_dir).is_dir():
        out.append(Problem("data.class_dir", repr(class_dir), "folder does not exist",
                           "create it, or set data.num_class_images to generate class images"))
    return out, sizes


def _validation_problems(cfg: RunConfig, images: int) -> list[Problem]:
    """data.validation: a holdout that leaves an image to train, a held-out folder that has images."""
    v, out = cfg.data.validation, []
    if images and v.holdout >= images:
        out.append(Problem("data.validation.holdout", str(v.holdout), f"keeps all {images} usable images out of "
                           "training", f"hold out at most {images - 1}, or use data.validation.dir"))
    if v.dir:
        try:
            data.scan_folder(v.dir, cfg.data.instance_prompt)
        except data.DataError as e:
            out.append(_problem("data.validation.dir", repr(v.dir), e, "point it at a folder of held-out images"))
    return out


def _model_problems(cfg: RunConfig) -> list[Problem]:
    from fluxlora.modelpath import resolve

    try:
        resolve(cfg.model.path)
    except ModelLoadError as e:
        return [_problem("model.path", repr(cfg.model.path), e, "give 'toy', a pipeline folder or a hub id")]
    return _scorer_problems(cfg)


def _scorer_problems(cfg: RunConfig) -> list[Problem]:
    """metrics.subject's models: a path that looks local must exist (a typo costs seconds, not a model load)."""
    from fluxlora.modelpath import looks_local

    if not cfg.metrics.subject:
        return []
    out = []
    for field in ("dino", "clip"):
        value = getattr(cfg.metrics, field)
        if looks_local(value) and not Path(value).expanduser().is_dir():
            out.append(Problem(f"metrics.{field}", repr(value), "no such model folder",
                               "give a local model folder or a hub id like facebook/dinov2-small, or set "
                               "metrics.subject=false"))
    return out


def _output_problems(cfg: RunConfig) -> list[Problem]:
    out_dir = Path(cfg.output_dir)
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the nearest existing ancestor must let us create the folder
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".fluxlora-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return [Problem("output_dir", repr(cfg.output_dir), f"cannot write there ({e.strerror})",
                        "choose a writable folder (output_dir=...)")]
    return []


def _init_from_problems(cfg: RunConfig) -> list[Problem]:
    # Rank and modules are checked against the loaded model (train.check_arm); a wrong path costs nothing.
    path = cfg.adapter.init_from
    if path is None or Path(path).is_file():
        return []
    return [Problem("adapter.init_from", repr(path), "file does not exist", "give the path of a LoRA .safetensors")]


def _method_problems(cfg: RunConfig, sizes: list[tuple[int, int]]) -> list[Problem]:
    """Each arm's method-specific data check (methods.py ``check``), e.g. LoRA-SB's distinct estimation images."""
    from fluxlora import buckets
    from fluxlora.config import arm_config

    out = []
    for name in cfg.adapter.arms:
        m, a = methods.METHODS[name], arm_config(cfg, name).adapter
        if not m.check or not sizes:
            continue
        t, members = cfg.train, buckets.for_run(cfg.model, cfg.data, sizes).members
        first = buckets.first_images(members, a.sb_batches, t.batch_size, cfg.data.repeats, t.seed)
        try:
            m.check_fn()(len(sizes), a.sb_batches, t.batch_size, a.init_from, cfg.data.repeats, first)
        except AdapterError as e:
            out.append(_problem(f"adapter.init {name}", None, e, "see the message"))
    return out


def check(cfg: RunConfig) -> None:
    """Raise one ConfigError, naming the config's file, listing every data, model-path, output-folder,
    init_from and method-data problem: everything that can be checked without the model's weights."""
    data_problems, sizes = _data_problems(cfg)
    problems = (data_problems + _model_problems(cfg) + _output_problems(cfg) + _init_from_problems(cfg)
                + _method_problems(cfg, sizes))
    if problems:
        raise ConfigError(cfg.source, problems)
