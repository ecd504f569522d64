"""Data-parallel training: 2 processes on CPU (torchrun, gloo) equal 1 process with the same global batch;
only the main process writes; resume works under 2 processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fluxlora.rundir import GroupDir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
# Two processes average two half-batch gradients where one process averages the whole batch at once:
# the same sums in another order, so float32 rounding differs. Measured max |diff| of the exported adapters
# after 3 AdamW steps at lr 1e-2 (2026-11-22, this test): lora 2.2e-6, loram 3.1e-7, on values up to 0.3.
ATOL = 1e-5


def write_config(tmp_path: Path, tiny_flux, subject_dir, name: str, steps: int, **train) -> Path:
    cfg = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_flux), "max_sequence_length": 24},
        "data": {"instance_dir": str(subject_dir), "resolution": 32},
        "adapter": {"init": ["lora", "loram"], "rank": 4},
        "train": {"steps": steps, "lr": 1.0e-2, "batch_size": 2, "checkpoint_every": 2, "seed": 0, **train},
        "sample": {"every": 2, "steps": 1, "seeds": [0], "prompts": ["a zxq emblem"]},
    }
    path = tmp_path / f"{name}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, "-m", "fluxlora.cli", "train", str(config), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--standalone", "-m", "fluxlora.cli", "train", str(config), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_same_adapters(a_root: Path, b_root: Path, atol: float) -> None:
    for arm in ("lora", "loram"):
        a = load_file(str(a_root / arm / "adapter.safetensors"))
        b = load_file(str(b_root / arm / "adapter.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process(tmp_path, tiny_flux, subject_dir):
    train(write_config(tmp_path, tiny_flux, subject_dir, "one", 3), 1)
    two = train(write_config(tmp_path, tiny_flux, subject_dir, "two", 3), 2)
    one_root, two_root = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    assert_same_adapters(one_root, two_root, ATOL)
    assert files(one_root) == files(two_root)  # the same run folder, written once
    for arm in ("lora", "loram"):
        one_log = GroupDir(one_root).arm(arm).metrics()
        two_log = GroupDir(two_root).arm(arm).metrics()
        assert [r["step"] for r in two_log] == [r["step"] for r in one_log]  # no record written twice
        for a, b in zip(one_log, two_log):
            if "loss" in a:  # identical draws; the loss is the mean over both processes' shares
                assert a["sigma_sum"] == b["sigma_sum"] and a["noise_sum"] == b["noise_sum"]
                assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert two.stdout.count("final loss") == 1  # one summary table, from the main process


@pytest.mark.slow
def test_two_process_run_resumes(tmp_path, tiny_flux, subject_dir):
    train(write_config(tmp_path, tiny_flux, subject_dir, "full", 4), 2)
    train(write_config(tmp_path, tiny_flux, subject_dir, "part", 2), 2)
    for arm in GroupDir(tmp_path / "runs" / "part").arms():
        arm.set_status("interrupted")
    train(write_config(tmp_path, tiny_flux, subject_dir, "part", 4), 2, "--resume")
    assert_same_adapters(tmp_path / "runs" / "full", tmp_path / "runs" / "part", atol=0)


def test_global_batch_must_divide_over_processes(tmp_path, tiny_flux, subject_dir):
    config = write_config(tmp_path, tiny_flux, subject_dir, "odd", 1, batch_size=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "fluxlora.cli", "train", str(config)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "train.batch_size 3 is the global batch" in done.stderr
    assert not (tmp_path / "runs" / "odd").exists()
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


@pytest.mark.slow
def test_arms_parallel_cpu_workers_equal_one_after_another(tmp_path, tiny_flux, subject_dir):
    """--arms-parallel 2 on a machine without GPUs: two CPU worker processes, one arm each, same results
    as training the arms one after another (tolerance: the workers may use another thread count)."""
    train(write_config(tmp_path, tiny_flux, subject_dir, "seq", 3, batch_size=1), 1)
    par = train(write_config(tmp_path, tiny_flux, subject_dir, "par", 3, batch_size=1), 1, "--arms-parallel", "2")
    assert "CPU process 0: lora" in par.stdout + par.stderr and "CPU process 1: loram" in par.stdout + par.stderr
    seq_root, par_root = tmp_path / "runs" / "seq", tmp_path / "runs" / "par"
    assert_same_adapters(seq_root, par_root, ATOL)
    assert files(seq_root) == files(par_root)
    group = GroupDir(par_root)
    assert group.info()["status"] == "done" and not (par_root / ".lock").exists()
    table = par.stdout[par.stdout.index("final loss"):]
    assert "lora " in table and "loram" in table and table.count("done") == 2


def test_arms_are_dealt_round_robin_and_gpus_are_required_without_a_number():
    from fluxlora.parallel import plan, worker_slots
    from fluxlora.runner import RunError

    assert plan(["lora", "pissa", "loram"], 2) == [["lora", "loram"], ["pissa"]]
    assert plan(["lora"], 4) == [["lora"]]
    if torch.cuda.device_count() < 2:
        with pytest.raises(RunError, match="at least 2 visible GPUs"):
            worker_slots(None)
        assert worker_slots(3) == (3, False)
