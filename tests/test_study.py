"""A study (`fluxlora sweep study.yaml`): several sweeps on one grid reported as one comparison, refused
unless every cell of every part is the same run but for its arms."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import yaml

from fluxlora import study
from fluxlora.config import dump_config
from fluxlora.config_errors import ConfigError
from fluxlora.rundir import GroupDir, write_json
from tests.conftest import tiny_config
from tests.sweep_helpers import VALIDATION, fake_arm

GRID = {"train.seed": [0, 1], "train.lr": [1.0e-3, 1.0e-2]}


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return str(path)


def part(tmp_path, base: str, name: str, arms: list[str], **extra) -> str:
    doc = {"name": extra.pop("sweep_name", name), "config": base, "output_dir": str(tmp_path / "runs"),
           "set": {"adapter.init": arms, **extra.pop("set", {})}, "grid": extra.pop("grid", GRID), **extra}
    return write_yaml(tmp_path / f"{name}.yaml", doc)


def study_file(tmp_path, parts: list[str], **report) -> str:
    return write_yaml(tmp_path / "study.yaml", {"name": "both", "parts": parts, **({"report": report} if report
                                                                                    else {})})


@pytest.fixture
def base(tmp_path, tiny_flux, subject_dir) -> str:
    path = tmp_path / "base.yaml"
    path.write_text(dump_config(tiny_config(tmp_path, tiny_flux, subject_dir, data={"validation": VALIDATION})))
    return str(path)


def fake_part(p: study.Part, score) -> None:
    """Finished cells for a part without training: each arm's val loss and fidelity from score(arm, values)."""
    for cell, cfg in p.planned:
        group = GroupDir(p.root / cell.name)
        group.root.mkdir(parents=True)
        group.write_info(arms=p.arms, status="done")
        for arm in p.arms:
            val, fid = score(arm, cell.values)
            fake_arm(group, arm, [{"step": 0, "val_loss_subject": 1.0, "subject_fidelity": 0.0},
                                  {"step": 2, "val_loss_subject": val, "subject_fidelity": fid}], final_loss=0.1)
    write_json(p.root / "sweep.json", {"name": p.sweep.name, "status": "done", "done": len(p.planned),
                                       "total": len(p.planned), "sweep": p.sweep.model_dump(mode="json"),
                                       "cells": [{"name": c.name, "values": c.values} for c, _ in p.planned]})


def score(arm: str, values: dict) -> tuple[float, float]:
    """lora is best at lr 1e-3, pissa at 1e-2; fidelity differs by arm, lr and seed."""
    good = {"lora": 1.0e-3, "pissa": 1.0e-2}[arm]
    lr, seed = values["train.lr"], values["train.seed"]
    return (0.2 if lr == good else 0.6) + 0.01 * seed, 10 * lr + 0.03 * seed + (0.5 if arm == "pissa" else 0.0)


def test_a_study_reports_every_parts_arms_each_at_its_own_best_lr(tmp_path, base):
    path = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"]), part(tmp_path, base, "later", ["pissa"])])
    s, root, parts = study.plan(path)
    assert root == tmp_path / "runs" / "both" and [p.arms for p in parts] == [["lora"], ["pissa"]]
    assert (s.report.seeds, s.report.choose) == ("train.seed", "train.lr")  # the parts' defaults
    for p in parts:
        fake_part(p, score)
    text = study.write(s, root, parts).read_text()
    for arm, lr in (("lora", 1.0e-3), ("pissa", 1.0e-2)):
        fid = [score(arm, {"train.lr": lr, "train.seed": seed})[1] for seed in (0, 1)]
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm} | - | {lr} | 2 |"))
        assert f"{statistics.fmean(fid):.4g} ± {statistics.stdev(fid):.2g}" in row
    assert "`first` (" in text and "arms pissa; 4 / 4 cells done" in text
    assert (root / "plots" / "subject_fidelity_steps.png").is_file()
    assert "| lora | lr=0.01 | 2 |" in text and "| pissa | lr=0.001 | 2 |" in text  # appendix: every lr
    assert text.startswith("# Study both")


@pytest.mark.parametrize("later, words", [
    ({"set": {"train.steps": 3}}, r"cell seed0_lr0.001: train.steps[\s\S]*has 2[\s\S]*has 3"),
    ({"grid": {"train.seed": [0, 1], "train.lr": [1.0e-3, 3.0e-3]}}, "differs from .*first.yaml's grid"),
    ({"grid": {"train.lr": [1.0e-3, 1.0e-2], "train.seed": [0, 1]}}, "differs from .*first.yaml's grid"),  # order
    ({"arms": ["pissa", "lora"]}, "lora: this arm is also in"),
    ({"sweep_name": "first"}, r"later.yaml: name = first: its folder .* is also .*first.yaml's"),
    ({"sweep_name": "both"}, r"later.yaml: name = both: its folder .* is also the study itself's"),
])
def test_a_study_refuses_parts_that_are_not_the_same_run_but_for_their_arms(tmp_path, base, later, words):
    path = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"]),
                                 part(tmp_path, base, "later", later.pop("arms", ["pissa"]), **later)])
    with pytest.raises(ConfigError, match=words):
        study.plan(path)


def test_a_study_checks_the_config_a_cell_was_trained_with_and_lets_arm_settings_differ(tmp_path, base, tiny_flux,
                                                                                         subject_dir):
    first = part(tmp_path, base, "first", ["lora"], set={"adapter.overrides": {"lora": {"lr": 2.0e-3}}})
    path = study_file(tmp_path, [first, part(tmp_path, base, "later", ["pissa"])])
    _, _, parts = study.plan(path)  # per-arm overrides are the arm's own setting
    trained = GroupDir(parts[1].root / "seed1_lr0.01")
    trained.root.mkdir(parents=True)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name="seed1_lr0.01", data={"validation": VALIDATION},
                      train={"steps": 2, "lr": 1.0e-2, "seed": 1, "warmup_steps": 1})
    trained.config_file.write_text(dump_config(cfg))
    with pytest.raises(ConfigError, match=r"cell seed1_lr0.01: train.warmup_steps"):
        study.plan(path)


def test_a_cell_trained_with_other_arms_than_its_part_lists_is_refused(tmp_path, base):
    path = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"]), part(tmp_path, base, "later", ["pissa"])])
    _, _, parts = study.plan(path)
    group = GroupDir(parts[0].root / "seed1_lr0.01")
    group.root.mkdir(parents=True)
    group.write_info(arms=["lora", "pissa"], status="done")  # pissa moved to a later part after training
    with pytest.raises(ConfigError, match=r"cell seed1_lr0.01: was trained with arms \['lora', 'pissa'\]"):
        study.plan(path)


def test_unset_report_fields_are_the_first_parts_and_a_partial_choice_says_so(tmp_path, base):
    rule = {"by": "subject_fidelity", "metrics": ["val_loss_subject"]}
    path = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"], report=rule),
                                 part(tmp_path, base, "later", ["pissa"])])
    s, root, parts = study.plan(path)
    assert (s.report.by, s.report.metrics, s.report.choose) == ("subject_fidelity", ["val_loss_subject"], "train.lr")
    fake_part(parts[0], score)
    fake_part(parts[1], score)
    for cell in ("seed0_lr0.01", "seed1_lr0.01"):  # pissa has lr 1e-2 on no seed yet: chosen among 1 of 2 lrs
        GroupDir(parts[1].root / cell).arm("pissa").set_status("running")
    text = study.write(s, root, parts).read_text()
    assert "subject_fidelity (selection)" in text
    assert "| pissa | - | 0.001 (1 of 2) | 2 |" in text and "| lora | - | 0.01 | 2 |" in text


def test_a_bad_study_file_is_named_with_the_fix(tmp_path, base):
    one = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"])])
    with pytest.raises(ConfigError, match="parts"):
        study.load_study(one)
    bad = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"]), part(tmp_path, base, "x", ["pissa"])],
                     choose="adapter.rank")
    with pytest.raises(ConfigError, match="report.choose = adapter.rank: not a grid field"):
        study.plan(bad)


@pytest.mark.slow
def test_the_command_trains_each_part_then_writes_one_report(tmp_path, base):
    one_cell = {"train.seed": [0], "train.lr": [1.0e-3]}
    path = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"], grid=one_cell),
                                 part(tmp_path, base, "later", ["pissa"], grid=one_cell)])
    cmd = [sys.executable, "-m", "fluxlora.cli", "sweep", path]
    out = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "study both: 2 parts on 1 cells" in out.stdout and "0 / 1 cells done" in out.stdout
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "runs" / "both" / "report.md").read_text()
    assert "| lora | - | 0.001 | 1 |" in text and "| pissa | - | 0.001 | 1 |" in text
    assert (tmp_path / "runs" / "first" / "seed0_lr0.001" / "lora" / "adapter.safetensors").is_file()
    out = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert out.stdout.count("1 / 1 cells done") == 2


def test_the_web_ui_lists_a_study_and_says_where_its_cells_are(tmp_path, base):
    from webui import views

    path = study_file(tmp_path, [part(tmp_path, base, "first", ["lora"]), part(tmp_path, base, "later", ["pissa"])])
    s, root, parts = study.plan(path)
    for p in parts:
        fake_part(p, score)
    study.write(s, root, parts)
    runs = tmp_path / "runs"
    assert views.sweep_names(runs) == ["both", "first", "later"]
    text = views.sweep_report(runs, "both", "/runs-file")
    assert "8 / 8 cells done" in text and "A study of first (" in text and "# Study both" in text


def test_an_arm_trains_the_same_whichever_arms_share_its_run(tmp_path, tiny_flux, subject_dir):
    """A study's premise: an arm added in a later part is what it would have been beside the earlier arms, data-
    driven inits too (their pass reads batches before training). Adapters and losses bit for bit."""
    from safetensors.torch import load_file

    from fluxlora.runner import run

    def train(arms: list[str], name: str) -> GroupDir:
        cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name=name, adapter={"init": arms, "rank": 2},
                          data={"validation": VALIDATION}, train={"steps": 3})
        assert all("error" not in r for r in run(cfg, warn=lambda m: None))
        return GroupDir(tmp_path / "runs" / name)

    together = train(["pissa", "lora_ga"], "together")
    for arm in ("lora_ga", "pissa"):
        alone = train([arm], f"{arm}_alone")
        a, b = together.arm(arm), alone.arm(arm)
        assert _without_times(a) == _without_times(b)  # losses, sigma and noise sums, validation, detectors
        fa, fb = load_file(a.root / "adapter.safetensors"), load_file(b.root / "adapter.safetensors")
        assert fa.keys() == fb.keys() and all((fa[k] == fb[k]).all() for k in fa)


def _without_times(arm) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "step_time")} for r in arm.metrics()]
