"""kill -9 at random moments, resume each time: the final adapter equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fluxlora.rundir import GroupDir

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, tiny_flux, subject_dir, name: str) -> Path:
    cfg = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_flux), "max_sequence_length": 24},
        "data": {"instance_dir": str(subject_dir), "resolution": 32},
        "adapter": {"init": "loram", "rank": 4},
        "train": {"steps": 30, "lr": 1.0e-3, "checkpoint_every": 1, "seed": 0},
        "sample": {"every": 0, "steps": 1, "seeds": [0], "prompts": ["a zxq emblem"]},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(config: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "fluxlora.cli", "train", str(config)] + (["--resume"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def assert_consistent(group: GroupDir) -> None:
    for arm in group.arms():
        status_text = arm.status_file.read_text() if arm.status_file.exists() else "{}"
        json.loads(status_text)  # valid JSON at any moment
        done = arm.checkpoints()
        if done:
            load_file(str(done[-1] / "adapter.safetensors"))
            torch.load(done[-1] / "trainer.pt", weights_only=False)


def wait_for_step(group: GroupDir, step: int, proc, timeout: float = 120.0) -> None:
    """Poll metrics.jsonl until ``step`` is logged (the process is then mid-training)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        records = group.arm("loram").metrics() if group.group_file.exists() else []
        if any(r.get("step", 0) >= step and "loss" in r for r in records):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with code {proc.returncode}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_kill9_at_random_moments_then_resume_matches_uninterrupted(tmp_path, tiny_flux, subject_dir):
    ref = write_config(tmp_path, tiny_flux, subject_dir, "ref")
    subprocess.run(train_cmd(ref, False), check=True, env=ENV, cwd=ROOT, capture_output=True)
    cut = write_config(tmp_path, tiny_flux, subject_dir, "cut")
    group = GroupDir(tmp_path / "runs" / "cut")
    rng = random.Random(7)  # fixed kill points: a reproducible test
    resume, killed_at = False, []
    for target in sorted(rng.sample(range(2, 29), 3)):
        proc = subprocess.Popen(train_cmd(cut, resume), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_step(group, target, proc)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside a step, a checkpoint or a log write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resume = True
        assert_consistent(group)
        killed_at.append(group.arm("loram").checkpoints()[-1].name)
    assert len(set(killed_at)) == 3, killed_at  # three different moments mid-training
    subprocess.run(train_cmd(cut, resume), check=True, env=ENV, cwd=ROOT, capture_output=True)
    a = load_file(str(tmp_path / "runs/ref/loram/adapter.safetensors"))
    b = load_file(str(tmp_path / "runs/cut/loram/adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [r["step"] for r in group.arm("loram").metrics() if "loss" in r]
    assert steps == list(range(1, 31))


def test_failed_checkpoint_write_keeps_the_previous_one_and_stops_clearly(tmp_path, tiny_flux, subject_dir,
                                                                          monkeypatch):
    import errno

    import fluxlora.checkpoint as C
    from conftest import tiny_config
    from fluxlora.runner import run

    real, calls = C.save_file, {"n": 0}

    def disk_full_on_second(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(C, "save_file", disk_full_on_second)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 4, "checkpoint_every": 1})
    result = run(cfg, warn=lambda m: None)[0]
    assert "No space left on device" in result["error"] and "previous checkpoint is kept" in result["error"]
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora")
    assert [p.name for p in arm.checkpoints()] == ["step-000001"]
    assert not [p for p in arm.checkpoints_dir.iterdir() if p.name.startswith(".tmp")]
    load_file(str(arm.checkpoints()[0] / "adapter.safetensors"))
    assert arm.status()["status"] == "failed"
