"""Held-out validation loss (fluxlora/validation.py): fixed tuples shared by every arm and by --resume, an
untrained arm scores exactly the base model, held-out images never train."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_resume_matches_uninterrupted, tiny_config
from fluxlora import validation

VALIDATION = {"holdout": 1, "prior_prompts": ["a small red circle on a white background, center"], "sigmas": 4}


def val_records(root, arm: str) -> list[dict]:
    lines = (root / arm / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_loss_subject" in r]


def test_holdout_is_spread_over_the_folder_and_checked():
    train, held = validation.split_holdout(list(range(10)), 3)
    assert held == [1, 5, 8] and train == [0, 2, 3, 4, 6, 7, 9]
    assert validation.split_holdout(list(range(4)), 0) == ([0, 1, 2, 3], [])
    assert validation.levels(4).tolist() == [0.125, 0.375, 0.625, 0.875]


def test_an_untrained_arm_scores_the_base_and_every_arm_gets_the_same_tuples(tmp_path, tiny_flux, subject_dir):
    from fluxlora.runner import run

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, data={"validation": VALIDATION},
                      adapter={"init": ["lora", "pissa"], "rank": 4},
                      train={"steps": 4, "lr": 1.0e-2}, sample={"every": 2, "steps": 2, "seeds": [0],
                                                                "prompts": ["a zxq emblem"]})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    root = tmp_path / "runs" / "tiny"
    lora, pissa = val_records(root, "lora"), val_records(root, "pissa")
    assert [r["step"] for r in lora] == [0, 2, 4]
    base = lora[0]["val_loss_subject_base"]
    for first in (lora[0], pissa[0]):  # step 0: the adapter is at its init, the output is the base's
        assert first["val_loss_subject"] == pytest.approx(base, rel=1e-5)
        assert first["val_loss_prior"] < 1e-10
    assert lora[-1]["val_loss_prior"] > 1e-6 and lora[-1]["val_loss_subject"] != pytest.approx(base, rel=1e-4)
    assert results[0]["final_validation"]["val_loss_subject"] == lora[-1]["val_loss_subject"]


def test_held_out_images_never_train_and_holding_out_all_is_refused(tmp_path, tiny_flux, subject_dir):
    from fluxlora.errors import DataError
    from fluxlora.prepare import prepare

    prep = prepare(tiny_config(tmp_path, tiny_flux, subject_dir, data={"validation": VALIDATION}),
                   torch.device("cpu"), warn=lambda m: None)
    assert prep.stats["images"] == 2 and prep.validation.n_subject == 1  # 3 images: 2 train, 1 held out
    assert len(prep.validation.latents) == 2 and prep.validation.noise[0].shape[0] == 4
    with pytest.raises(DataError, match="holdout 3 would keep every one"):
        prepare(tiny_config(tmp_path, tiny_flux, subject_dir, data={"validation": {"holdout": 3}}),
                torch.device("cpu"), warn=lambda m: None)


def test_validation_resumes_with_the_same_numbers(tmp_path, tiny_flux, subject_dir):
    def make(name, steps):
        return tiny_config(tmp_path, tiny_flux, subject_dir, name=name, data={"validation": VALIDATION},
                           train={"steps": steps, "checkpoint_every": 2}, sample={"every": 2})

    assert_resume_matches_uninterrupted(tmp_path, make, "lora")
    full, part = val_records(tmp_path / "runs" / "full", "lora"), val_records(tmp_path / "runs" / "part", "lora")
    assert [r["step"] for r in part] == [0, 2, 4]
    assert full[-1]["val_loss_subject"] == part[-1]["val_loss_subject"]
    assert full[-1]["val_loss_prior"] == part[-1]["val_loss_prior"]


def test_the_checks_before_any_model_name_the_validation_fields(tmp_path, tiny_flux, subject_dir):
    from fluxlora import preflight
    from fluxlora.config import ConfigError

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir,
                      data={"validation": {"holdout": 3, "dir": str(tmp_path / "missing")}})
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg)
    where = {p.where for p in err.value.problems}
    assert {"data.validation.holdout", "data.validation.dir"} <= where
