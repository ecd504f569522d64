"""Every refusal the trainer can make, and when: the ones that need no model weights come before any model
loads (all problems of a phase at once, nothing written); the few that need the loaded model come before any
arm trains, and a run folder the refused invocation created is removed again.

Why those few need the model: which Linear modules a target suffix matches (and whether one is a
convolution), the shapes that bound the rank, the module names a format's keys can hold, and whether an
adapter.init_from file's modules and sizes fit the model all come from the instantiated denoiser."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from fluxlora import modelpath
from fluxlora.config import ConfigError
from fluxlora.errors import AdapterError
from fluxlora.runner import run


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks")
    monkeypatch.setattr(modelpath, "load_base", refuse)


BEFORE_LOADING = [
    ({"adapter": {"init": ["lora", "loram"], "rank": 1}}, "adapter.rank 1 is too small for loram"),
    ({"adapter": {"init": ["lora", "loram"], "rank": 4, "overrides": {"loram": {"rank": 1}}}},
     "adapter.overrides.loram.rank 1 is too small for loram"),
    ({"adapter": {"init": ["lora", "lora_sb"], "sb_batches": 4}}, "4 distinct subject images, but"),
    ({"adapter": {"init": "lora_sb", "sb_batches": 1}, "data": {"repeats": 2}}, "data.repeats=1"),
    ({"export": {"formats": ["kohya"]}}, "unknown export format"),
    ({"model": {"family": "sdxl", "quantize": "int8"}}, "model.quantize int8 is for the transformer families"),
]


@pytest.mark.parametrize("change, message", BEFORE_LOADING)
def test_refused_before_any_model_loads_and_nothing_written(tmp_path, tiny_flux, subject_dir, no_model, change,
                                                            message):
    with pytest.raises(ConfigError, match=message):
        run(tiny_config(tmp_path, tiny_flux, subject_dir, **change), warn=lambda m: None)
    assert not (tmp_path / "runs").exists()


def test_every_problem_of_the_checks_is_reported_at_once(tmp_path, tiny_flux, subject_dir, no_model):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "lora_sb"], "sb_batches": 9,
                                                                  "init_from": str(tmp_path / "nope.safetensors")},
                      data={"class_dir": str(tmp_path / "missing"), "class_prompt": "an emblem"})
    with pytest.raises(ConfigError) as e:
        run(cfg, warn=lambda m: None)
    text = str(e.value)
    assert "data.class_dir" in text and "adapter.init_from" in text and "adapter.init lora_sb" in text


AFTER_LOADING = [
    ({"adapter": {"init": ["lora", "pissa"], "target_modules": ["no_such_layer"]}}, "no Linear layer"),
    ({"adapter": {"init": ["lora", "pissa"], "rank": 40}}, r"= \[1, 32\] for lora"),
    ({"adapter": {"init": ["lora", "pissa"], "target_modules": ["to_q", "conv_in"]}}, r"\['conv_in'\] match no Linear layer"),
]


@pytest.mark.parametrize("change, message", AFTER_LOADING)
def test_model_dependent_refusals_come_before_any_arm_trains(tmp_path, tiny_flux, subject_dir, change, message):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, **change)
    with pytest.raises(AdapterError, match=message):
        run(cfg, warn=lambda m: None)
    assert not (tmp_path / "runs" / "tiny").exists()  # the refused invocation's run folder is gone again
    # (an adapter.init_from file that does not fit: tests/test_interop.py, the same guarantee)


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(tmp_path, tiny_flux, subject_dir,
                                                                          monkeypatch):
    import shutil

    from fluxlora.errors import RunError

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))  # 10 kB left
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "loram"]})
    with pytest.raises(RunError, match=r"need about [\d.]+ [km]B but .* 10 kB free -> fix: free disk space"):
        run(cfg, warn=lambda m: None)
    assert not (tmp_path / "runs" / "tiny").exists()
