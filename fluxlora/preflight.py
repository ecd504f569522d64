"""Checks before anything heavy loads: data folders, model path, output folder. All problems together.

A typo in a path must cost seconds, not the minutes it takes to load a model first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fluxlora import data
from fluxlora.config import ConfigError, Problem, RunConfig
from fluxlora.errors import ModelLoadError


def _data_problems(cfg: RunConfig) -> list[Problem]:
    out = []
    try:
        data.scan_folder(cfg.data.instance_dir, cfg.data.instance_prompt, recursive=cfg.data.recursive)
    except data.DataError as e:
        message, _, fix = str(e).rpartition("-> fix: ")  # DataError messages carry their own fix
        out.append(Problem("data.instance_dir", repr(cfg.data.instance_dir), message.strip() or str(e),
                           fix.strip() if message else "point it at a folder of usable images"))
    class_dir = cfg.data.class_dir
    if class_dir and not cfg.data.num_class_images and not Path(class_dir).is_dir():
        out.append(Problem("data.class_dir", repr(class_dir), "folder does not exist",
                           "create it, or set data.num_class_images to generate class images"))
    return out


def _model_problems(cfg: RunConfig) -> list[Problem]:
    from fluxlora.modelpath import resolve

    try:
        resolve(cfg.model.path)
    except ModelLoadError as e:
        return [Problem("model.path", repr(cfg.model.path), str(e).split(" -> fix: ")[0],
                        str(e).split(" -> fix: ")[-1])]
    return []


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


def check(cfg: RunConfig) -> None:
    """Raise one ConfigError, naming the config's file, listing every data, model-path, output-folder and
    init_from problem."""
    problems = _data_problems(cfg) + _model_problems(cfg) + _output_problems(cfg) + _init_from_problems(cfg)
    if problems:
        raise ConfigError(cfg.source, problems)
