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

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fluxlora.rundir import GroupDir

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, tiny_flux, subject_dir, name: str, **train) -> Path:
    cfg = {
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_flux), "max_sequence_length": 24},
        "data": {"instance_dir": str(subject_dir), "resolution": 32},
        "adapter": {"init": "loram", "rank": 4},
        "train": {"steps": 30, "lr": 1.0e-3, "checkpoint_every": 1, "seed": 0, **train},
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
    partial = group.arm("loram").checkpoints_dir / ".tmp-step-000004-1"  # as a kill inside a save leaves it
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"half")
    subprocess.run(train_cmd(cut, resume), check=True, env=ENV, cwd=ROOT, capture_output=True)
    assert not list(group.arm("loram").checkpoints_dir.glob(".tmp-*"))
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


# `fluxlora train` with one test hook: step ``AT + 1`` stops in its batch preparation (touching a marker
# file) long enough for the test's SIGINT to arrive there, so the signal lands at a known moment.
HOOKED_TRAIN = """
import pathlib, sys, time
import fluxlora.train as T
real, marker, at = T.make_batch, pathlib.Path(sys.argv[1]), int(sys.argv[2])
def make_batch(prep, micro, *args, **kwargs):
    if micro == at and not marker.exists():
        marker.touch()
        time.sleep(60)
    return real(prep, micro, *args, **kwargs)
T.make_batch = make_batch
from fluxlora.cli import main
sys.exit(main(sys.argv[3:]))
"""


def assert_same_adapter(a_file: Path, b_file: Path) -> None:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("sig, code, said", [
    (signal.SIGINT, 130, "interrupted: a checkpoint was saved; continue with --resume"),
    (signal.SIGTERM, 143, "stopped by SIGTERM: a checkpoint was saved; continue with --resume"),
    (signal.SIGUSR1, 138, "stopped by SIGUSR1: a checkpoint was saved; continue with --resume"),
])
def test_stop_signal_saves_a_checkpoint_and_resume_matches(tmp_path, tiny_flux, subject_dir, sig, code, said):
    """Ctrl-C, and the signals schedulers send before a kill (docker stop / systemd / spot preemption: SIGTERM;
    SLURM's warning: SIGUSR1), each mid-step: the completed steps are checkpointed, resume is exact.
    checkpoint_every=0: the only checkpoint before the end is the one the signal writes. The child gets the
    default SIGINT disposition whatever this test process inherited (a background shell ignores SIGINT)."""
    from fluxlora.signals import child_default_sigint

    ref = write_config(tmp_path, tiny_flux, subject_dir, "ref", steps=6, checkpoint_every=0)
    subprocess.run(train_cmd(ref, False), check=True, env=ENV, cwd=ROOT, capture_output=True)
    cut = write_config(tmp_path, tiny_flux, subject_dir, "cut", steps=6, checkpoint_every=0)
    marker, group = tmp_path / "in-step-4", GroupDir(tmp_path / "runs" / "cut")
    proc = subprocess.Popen([sys.executable, "-c", HOOKED_TRAIN, str(marker), "3", "train", str(cut)], env=ENV,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=child_default_sigint)
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 120, "step 4 not reached"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert said in err and "Traceback" not in err
    arm = group.arm("loram")
    assert [p.name for p in arm.checkpoints()] == ["step-000003"]  # steps 1-3 done, step 4 cut short
    assert not [p for p in arm.checkpoints_dir.iterdir() if p.name.startswith(".tmp")]
    assert arm.status()["status"] == "interrupted" and group.info()["status"] == "interrupted"
    assert (signal.Signals(sig).name in arm.status()["error"]) == (sig != signal.SIGINT)
    assert not arm.adapter_file.exists() and not (group.root / ".lock").exists()
    assert_consistent(group)
    done = subprocess.run(train_cmd(cut, True), env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_adapter(tmp_path / "runs/ref/loram/adapter.safetensors", arm.adapter_file)
    assert [r["step"] for r in arm.metrics() if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert arm.status()["status"] == "done"


def test_ctrl_c_right_after_an_update_resumes_exactly(tmp_path, tiny_flux, subject_dir, monkeypatch):
    import types

    import fluxlora.train as T
    from conftest import tiny_config
    from fluxlora.runner import run

    run(tiny_config(tmp_path, tiny_flux, subject_dir, name="full", train={"steps": 4}), warn=lambda m: None)
    real = T.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer, calls = real(*args, **kwargs), []
        step = optimizer.step

        def step_then_ctrl_c(self, *a, **kw):
            out = step(*a, **kw)
            calls.append(1)
            if len(calls) == 2:  # the second update is applied: a real SIGINT arrives now
                os.kill(os.getpid(), signal.SIGINT)
            return out

        optimizer.step = types.MethodType(step_then_ctrl_c, optimizer)
        return optimizer

    monkeypatch.setattr(T, "make_optimizer", make_optimizer)
    cut = tiny_config(tmp_path, tiny_flux, subject_dir, name="cut", train={"steps": 4})
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored, however pytest started
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cut, warn=lambda m: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(T, "make_optimizer", real)
    run(cut, resume=True, warn=lambda m: None)
    assert_same_adapter(tmp_path / "runs/full/lora/adapter.safetensors", tmp_path / "runs/cut/lora/adapter.safetensors")


def test_failed_export_write_keeps_the_checkpoint_and_the_previous_file(tmp_path, tiny_flux, subject_dir,
                                                                        monkeypatch):
    import errno

    import fluxlora.export as E
    from conftest import tiny_config
    from fluxlora import commands
    from fluxlora.runner import run

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = E.save_file
    monkeypatch.setattr(E, "save_file", disk_full)
    result = run(tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2}), warn=lambda m: None)[0]
    root = tmp_path / "runs" / "tiny"
    assert "No space left on device" in result["error"] and "the final checkpoint is kept" in result["error"]
    assert f"fluxlora export {root}" in result["error"]
    arm = GroupDir(root).arm("lora")
    assert arm.status()["status"] == "failed" and [p.name for p in arm.checkpoints()] == ["step-000002"]
    assert sorted(p.name for p in arm.root.iterdir()) == ["checkpoints", "init.json", "metrics.jsonl", "samples",
                                                         "status.json"]  # no half-written or temp file
    monkeypatch.setattr(E, "save_file", real)
    assert commands.export(root, None) == 0  # the way out the message names
    written = {p.name: p.read_bytes() for p in arm.root.glob("*.safetensors")}
    assert set(written) == {"adapter.safetensors", "adapter_comfyui.safetensors"}
    run(tiny_config(tmp_path, tiny_flux, subject_dir, name="ok", train={"steps": 2}), warn=lambda m: None)
    assert_same_adapter(tmp_path / "runs/ok/lora/adapter.safetensors", arm.adapter_file)
    monkeypatch.setattr(E, "save_file", disk_full)  # a failing re-export leaves the previous files whole
    from fluxlora.runner import RunError

    with pytest.raises(RunError, match="previous files and the checkpoints are kept"):
        commands.export(root, None)
    assert {p.name: p.read_bytes() for p in arm.root.glob("*.safetensors")} == written
    assert not [p for p in arm.root.iterdir() if p.name.startswith(".export-")]


def _nan_on(calls: set, monkeypatch) -> None:
    """loss_step returns a NaN loss on the given (1-based) calls; gradients become NaN too."""
    import fluxlora.train as T

    real, n = T.loss_step, [0]

    def poisoned(*args, **kwargs):
        loss, rec = real(*args, **kwargs)
        n[0] += 1
        return (loss * float("nan") if n[0] in calls else loss), rec

    monkeypatch.setattr(T, "loss_step", poisoned)


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, tiny_flux, subject_dir, monkeypatch):
    from conftest import tiny_config
    from fluxlora.runner import run

    _nan_on({2}, monkeypatch)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 3, "max_bad_steps": 2, "checkpoint_every": 1})
    result = run(cfg, warn=lambda m: None)[0]
    assert "error" not in result, result
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora")
    assert [(r["step"], r.get("skipped", False)) for r in arm.metrics()] == [(1, False), (2, True), (3, False)]
    assert [p.name for p in arm.checkpoints()] == ["step-000001", "step-000003"]  # none of the bad step
    tensors = load_file(str(arm.adapter_file))  # NaN gradients applied would have made every weight NaN
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_nonfinite_stop_names_step_and_causes_and_keeps_checkpoint_and_samples(tmp_path, tiny_flux, subject_dir,
                                                                               monkeypatch):
    from conftest import tiny_config
    from fluxlora.runner import run

    _nan_on(set(range(2, 100)), monkeypatch)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 6, "max_bad_steps": 3, "checkpoint_every": 1},
                      sample={"every": 1})
    error = run(cfg, warn=lambda m: None)[0]["error"]
    assert "not finite for 3 consecutive steps (last at step 4)" in error
    assert "train.lr" in error and "fp16" in error and "--resume" in error
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora")
    assert arm.status()["status"] == "failed" and [p.name for p in arm.checkpoints()] == ["step-000001"]
    load_file(str(arm.checkpoints()[0] / "adapter.safetensors"))
    assert sorted(p.name for p in arm.samples_dir.iterdir()) == ["step-000000", "step-000001"]


def test_a_stop_whose_checkpoint_cannot_be_written_still_stops_the_run(tmp_path, tiny_flux, subject_dir,
                                                                       monkeypatch):
    """Ctrl-C / SIGTERM and a full disk at that moment: the stop wins (no next arm starts, status interrupted),
    the failed save is reported, and the earlier checkpoint is what --resume continues from."""
    import errno

    import fluxlora.checkpoint as C
    import fluxlora.train as T
    from conftest import tiny_config
    from fluxlora.runner import run

    real_batch, real_save = T.make_batch, C.save_file

    def stop_at_3(prep, micro, *args, **kwargs):
        if micro == 3:
            monkeypatch.setattr(C, "save_file", lambda *a, **k: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, "No space left on device")))
            raise KeyboardInterrupt
        return real_batch(prep, micro, *args, **kwargs)

    monkeypatch.setattr(T, "make_batch", stop_at_3)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "pissa"]},
                      train={"steps": 4, "checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, warn=lambda m: None)
    group = GroupDir(tmp_path / "runs" / "tiny")
    assert group.arm("lora").status()["status"] == "interrupted" and group.info()["status"] == "interrupted"
    assert [p.name for p in group.arm("lora").checkpoints()] == ["step-000002"]
    assert group.arm("pissa").status()["status"] == "queued"  # the next arm did not start
    monkeypatch.setattr(T, "make_batch", real_batch)
    monkeypatch.setattr(C, "save_file", real_save)
    assert all("error" not in r for r in run(cfg, resume=True, warn=lambda m: None))
