"""Shared fixtures: a tiny random FLUX pipeline on disk and a small subject folder (all offline)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from fluxlora.toy.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory):
    """Three views of the toy subject with captions (rendered, not shipped)."""
    from fluxlora.toy.subject import DATASET, render_subject, subject_caption

    d = tmp_path_factory.mktemp("subject")
    for i, (bg, pos) in enumerate(DATASET[:3]):
        Image.fromarray(render_subject(bg, pos, 32)).save(d / f"{i:02d}.png")
        (d / f"{i:02d}.txt").write_text(subject_caption(bg, pos))
    return d


def tiny_config(tmp_path, tiny_flux, subject_dir, **sections):
    """A RunConfig for a 32 px tiny run; keyword sections are merged over the defaults."""
    from fluxlora.config import parse_config

    raw = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_flux), "max_sequence_length": 24},
        "data": {"instance_dir": str(subject_dir), "resolution": 32},
        "adapter": {"init": "lora", "rank": 4},
        "train": {"steps": 2, "lr": 1.0e-3, "checkpoint_every": 0, "seed": 0},
        "sample": {"every": 0, "steps": 2, "seeds": [0], "prompts": ["a zxq emblem on a red background, center"]},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return parse_config(raw)


def method_config(method: str, rank: int, tmp_path, tiny_flux, subject_dir, lr: float = 1.0e-2, **sections):
    """tiny_config for one init method's tests: that method at ``rank``, 2 steps at ``lr``; keyword sections
    merge over these."""
    sections["adapter"] = {"init": method, "rank": rank, **sections.get("adapter", {})}
    sections["train"] = {"steps": 2, "lr": lr, **sections.get("train", {})}
    return tiny_config(tmp_path, tiny_flux, subject_dir, **sections)


@pytest.fixture(scope="session")
def finished_group(tmp_path_factory, tiny_flux, subject_dir):
    """A finished 2-arm tiny run with samples at steps 0, 2, 4 (shared by the web UI tests; do not modify it)."""
    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    root = tmp_path_factory.mktemp("webui")
    cfg = tiny_config(root, tiny_flux, subject_dir, adapter={"init": ["lora", "loram"], "rank": 4},
                      train={"steps": 4, "lr": 1.0e-2}, sample={"every": 2, "steps": 2, "seeds": [0, 1],
                                                                "prompts": ["a zxq emblem on a red background, center"]})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    return root / "runs", GroupDir(root / "runs" / "tiny")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    from fluxlora.toy.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory, tiny_sd3):
    """family -> a tiny pipeline directory of that family (the others built on first use)."""
    from fluxlora.toy.tiny import build_tiny_unet_pipeline
    from fluxlora.toy.tiny_flux2 import build_tiny_flux2
    from fluxlora.toy.tiny_qwen_image import build_tiny_qwen_image
    from fluxlora.toy.tiny_z_image import build_tiny_z_image

    built = {"sd3": tiny_sd3}
    builders = {"sdxl": lambda out: build_tiny_unet_pipeline(out, xl=True),
                "sd15": lambda out: build_tiny_unet_pipeline(out, xl=False),
                "flux2": build_tiny_flux2, "z_image": build_tiny_z_image, "qwen_image": build_tiny_qwen_image}

    def get(family: str):
        if family not in built:
            built[family] = builders[family](tmp_path_factory.mktemp(family) / "pipe")
        return built[family]

    return get


def assert_resume_matches_uninterrupted(tmp_path, make_cfg, arm: str) -> dict:
    """``make_cfg(name, steps)`` -> a RunConfig with checkpoints every 2 steps. Run "full" to 4 steps; run
    "part" to 2 (as if stopped after the step-2 checkpoint), mark it interrupted and resume it to 4: the
    two exported adapters must be bit-identical. Returns the final adapter's tensors."""
    from safetensors.torch import load_file

    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    run(make_cfg("full", 4), warn=lambda m: None)
    run(make_cfg("part", 2), warn=lambda m: None)
    GroupDir(tmp_path / "runs" / "part").arm(arm).set_status("interrupted")
    run(make_cfg("part", 4), resume=True, warn=lambda m: None)
    a = load_file(str(tmp_path / "runs" / "full" / arm / "adapter.safetensors"))
    b = load_file(str(tmp_path / "runs" / "part" / arm / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    return a
