"""`fluxlora sweep`: the grid, skip and resume of cells, the report (choice and statistics checked against a
direct computation) and the web UI's view of it."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from fluxlora import report
from fluxlora.config import dump_config
from fluxlora.config_errors import ConfigError
from fluxlora.errors import RunError
from fluxlora.rundir import GroupDir, group_label, list_groups, write_json
from fluxlora.sweep_config import SweepConfig, cells
from tests.conftest import tiny_config
from tests.sweep_helpers import VALIDATION, fake_arm



def sweep_file(tmp_path, base: str, **extra) -> str:
    doc = {"name": "grid", "config": base, "output_dir": str(tmp_path / "runs"), "set": {"train.steps": 2},
           "grid": {"train.seed": [0, 1], "train.lr": [1.0e-3, 1.0e-2]}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return str(path)


def test_cells_cover_the_grid_in_order_with_readable_names():
    s = SweepConfig(name="s", config="c.yaml", grid={"train.seed": [0, 1], "train.lr": [1e-4, 3e-3],
                                                      "adapter.init": [["lora", "pissa"]]})
    names = [c.name for c in cells(s)]
    assert names == ["seed0_lr0.0001_initlora+pissa", "seed0_lr0.003_initlora+pissa",
                     "seed1_lr0.0001_initlora+pissa", "seed1_lr0.003_initlora+pissa"]
    both = SweepConfig(name="s", config="c.yaml", grid={"train.lr": [1.0], "adapter.overrides.pissa.lr": [2.0]},
                       report={"choose": None})
    assert [c.name for c in cells(both)] == ["train_lr1_adapter_overrides_pissa_lr2"]  # two fields named lr


@pytest.mark.parametrize("doc, words", [
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"train.lr": []}}, "has no values"),
    ({"grid": {"name": ["a", "b"]}}, "set by the sweep"),
    ({"set": {"train.lr": 1.0}}, "both in set and in grid"),
    ({"report": {"choose": "adapter.rank"}}, "not a grid field"),
    ({"report": {"seeds": "train.steps"}}, "not a grid field"),
    ({"report": {"by": "prior_accuracy_base"}}, "not a score"),
    ({"report": {"metrics": ["subject_fidelity", "val_loss_subject"]}}, "the choice is made on"),
])
def test_a_bad_sweep_file_is_named_with_the_fix(tmp_path, doc, words):
    from fluxlora.sweep_config import load_sweep

    base = {"name": "s", "config": "c.yaml", "grid": {"train.lr": [1.0e-3], "train.seed": [0]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**base, **doc}))
    with pytest.raises(ConfigError, match=words):
        load_sweep(path)


def test_a_bad_value_in_the_grid_is_named_with_its_cell_before_anything_trains(tmp_path, tiny_flux, subject_dir):
    from fluxlora.sweep import plan
    from fluxlora.sweep_config import load_sweep

    base = tmp_path / "base.yaml"
    base.write_text(dump_config(tiny_config(tmp_path, tiny_flux, subject_dir)))
    path = sweep_file(tmp_path, str(base), grid={"adapter.rank": [4, -1]}, report={"seeds": None, "choose": None})
    with pytest.raises(ConfigError, match=r"sweep cell rank-1[\s\S]*adapter.rank"):
        plan(load_sweep(path))
    assert not (tmp_path / "runs" / "grid").exists()


def fake_sweep(root) -> dict:
    """Two arms x lr {1, 2} x seeds {0, 1, 2}; arm "a" is best (lowest val loss) at lr 2, "b" at lr 1."""
    values = {}
    grid = {"train.lr": [1.0, 2.0], "train.seed": [0, 1, 2]}
    cells_ = cells(SweepConfig(name="f", config="c.yaml", grid=grid))
    for cell in cells_:
        lr, seed = cell.values["train.lr"], cell.values["train.seed"]
        group = GroupDir(root / cell.name)
        group.root.mkdir(parents=True)
        group.write_info(arms=["a", "b"], status="done")
        for arm, good in (("a", 2.0), ("b", 1.0)):
            val = (0.1 if lr == good else 0.5) + 0.01 * seed
            fid = 0.3 * lr + 0.05 * seed + (0.2 if arm == "b" else 0.0)
            values[(arm, lr, seed)] = fid
            fake_arm(group, arm, [{"step": 0, "val_loss_subject": 1.0, "subject_fidelity": 0.0},
                                  {"step": 5, "loss": 0.3},
                                  {"step": 10, "val_loss_subject": val, "subject_fidelity": fid}], final_loss=0.2)
    write_json(root / "sweep.json", {"name": "f", "status": "done", "done": 6, "total": 6,
                                     "sweep": {"report": {"seeds": "train.seed", "choose": "train.lr",
                                                          "by": "val_loss_subject"}},
                                     "cells": [{"name": c.name, "values": c.values} for c in cells_]})
    return values


def test_report_chooses_each_arm_on_the_selection_metric_and_reports_others_over_seeds(tmp_path):
    values = fake_sweep(tmp_path)
    state, runs = report.collect(tmp_path)
    assert len(runs) == 12 and all("loss" not in r.series for r in runs)
    best = report.choose(runs, "train.seed", "train.lr", "val_loss_subject")
    chosen = {key[0]: {r.values["train.lr"] for r in group} for key, group in best.items()}
    assert chosen == {"a": {2.0}, "b": {1.0}}
    partial = [r for r in runs if not (r.arm == "a" and r.values["train.lr"] == 2.0 and r.values["train.seed"] > 0)]
    best = report.choose(partial, "train.seed", "train.lr", "val_loss_subject")
    a = next(g for k, g in best.items() if k[0] == "a")  # its better lr 2 has one seed so far: not compared yet
    assert {r.values["train.lr"] for r in a} == {1.0} and len(a) == 3
    text = report.write(tmp_path).read_text()
    fid_a = [values[("a", 2.0, s)] for s in (0, 1, 2)]
    direct = f"{statistics.fmean(fid_a):.4g} ± {statistics.stdev(fid_a):.2g}"
    row = next(line for line in text.splitlines() if line.startswith("| a | - | 2.0 |"))
    assert direct in row and "| 3 |" in row
    header = next(line for line in text.splitlines() if line.startswith("| arm | setting | best lr"))
    assert "val_loss_subject (selection)" in header and header.count("val_loss_subject") == 1
    for name in ("subject_fidelity_steps.png", "subject_fidelity_by_lr.png", "val_loss_subject_by_lr.png"):
        assert f"(plots/{name})" in text
        assert Image.open(tmp_path / "plots" / name).size[0] > 200


def test_the_web_ui_lists_sweeps_their_cells_and_shows_the_report(tmp_path):
    from webui import views

    runs = tmp_path / "runs"
    fake_sweep(runs / "f")
    report.write(runs / "f")
    GroupDir(runs / "plain").root.mkdir()
    GroupDir(runs / "plain").write_info(arms=["lora"], status="done")
    labels = [group_label(runs, g) for g in list_groups(runs)]
    assert labels[0] == "f/lr1_seed0" and "plain" in labels and len(labels) == 7
    assert views.open_group(runs, "f/lr2_seed1").root == runs / "f" / "lr2_seed1"
    assert views.open_group(runs, "lr2_seed1") is None
    assert views.sweep_names(runs) == ["f"]
    text = views.sweep_report(runs, "f", "/runs-file")
    assert "6 / 6 cells done" in text and "](/runs-file/f/plots/subject_fidelity_steps.png)" in text
    assert "no sweep selected" in views.sweep_report(runs, "../f", "/runs-file")


@pytest.mark.slow
def test_a_sweep_trains_every_cell_skips_finished_ones_and_resumes_the_rest(tmp_path, tiny_flux, subject_dir,
                                                                             monkeypatch):
    from fluxlora import runner
    from fluxlora.sweep import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(dump_config(tiny_config(tmp_path, tiny_flux, subject_dir, data={"validation": VALIDATION},
                                            train={"checkpoint_every": 1})))
    path = sweep_file(tmp_path, str(base), grid={"train.lr": [1.0e-3, 1.0e-2]}, report={"seeds": None})
    root = run_sweep(path, warn=lambda m: None)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["lr0.001", "lr0.01", "plots"]
    text = (root / "report.md").read_text()
    assert "Cells done: 2 / 2" in text and "| lora | - | " in text and "(plots/val_loss_subject_by_lr.png)" in text
    calls = []
    real = runner.run
    monkeypatch.setattr(runner, "run", lambda cfg, resume=False, warn=print: calls.append((cfg.name, resume))
                        or real(cfg, resume=resume, warn=warn))
    run_sweep(path, warn=lambda m: None)
    assert calls == []  # every cell finished: nothing trains
    arm = GroupDir(root / "lr0.01").arm("lora")
    arm.set_status("interrupted")
    run_sweep(path, warn=lambda m: None)
    assert calls == [("lr0.01", True)] and arm.status()["status"] == "done"
    run_sweep(path, warn=lambda m: None)  # a resumed cell records train.resume: latest; still the same cell
    assert calls == [("lr0.01", True)]
    changed = sweep_file(tmp_path, str(base), set={"train.steps": 3}, grid={"train.lr": [1.0e-3, 1.0e-2]},
                         report={"seeds": None})
    with pytest.raises(RunError, match="lr0.001 was trained with another config"):
        run_sweep(changed, warn=lambda m: None)


def test_two_workers_share_a_sweep_each_skipping_the_cell_the_other_trains(tmp_path, tiny_flux, subject_dir):
    from fluxlora.rundir import read_json
    from fluxlora.sweep import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(dump_config(tiny_config(tmp_path, tiny_flux, subject_dir)))
    path = sweep_file(tmp_path, str(base), grid={"train.lr": [1.0e-3, 1.0e-2]}, report={"seeds": None})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the other worker
    try:
        busy = tmp_path / "runs" / "grid" / "lr0.001"
        busy.mkdir(parents=True)
        (busy / ".lock").write_text(str(other.pid))
        lines = []
        root = run_sweep(path, warn=lines.append)
    finally:
        other.kill()
        other.wait()
    assert "sweep cell lr0.001: another process is training it; skipped" in lines
    assert not (busy / "group.json").exists() and (root / "lr0.01" / "group.json").exists()
    state = read_json(root / "sweep.json")
    assert (state["done"], state["status"]) == (1, "incomplete")
    run_sweep(path, warn=lines.append)  # the other worker is gone: its stale lock is taken over
    assert read_json(root / "sweep.json")["status"] == "done"


def test_the_command_line_lists_the_cells(tmp_path, tiny_flux, subject_dir):
    base = tmp_path / "base.yaml"
    base.write_text(dump_config(tiny_config(tmp_path, tiny_flux, subject_dir)))
    path = sweep_file(tmp_path, str(base))
    out = subprocess.run([sys.executable, "-m", "fluxlora.cli", "sweep", path, "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 cells x 1 arm into" in out.stdout and "seed1_lr0.01" in out.stdout and " new" in out.stdout
    out = subprocess.run([sys.executable, "-m", "fluxlora.cli", "sweep", path, "--report"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "holds no sweep yet" in out.stderr


def test_plot_panels_order_numbers_by_value():
    from fluxlora.report_plots import _panels

    keys = [("lora", ("adapter.rank", 16)), ("lora", ("adapter.rank", 4)), ("pissa", ("adapter.rank", 4))]
    assert _panels(keys) == [(("adapter.rank", 4),), (("adapter.rank", 16),)]
