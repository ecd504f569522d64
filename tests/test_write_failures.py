"""Disk full (or any write failure) at every writer, whatever exception the writer raises: the arm stops with
one message naming what failed and the way out, status 'failed', no partial folder, and --resume afterwards
ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import tiny_config
from fluxlora.rundir import GroupDir
from fluxlora.runner import run

FULL = {
    "OSError": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "RuntimeError": lambda: RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing "
                                         "file data/0: file write failed"),
    "SafetensorError": lambda: SafetensorError("Error while serializing: IoError(No space left on device)"),
}


def failing_on(call: int, error, real):
    calls = {"n": 0}

    def writer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error()
        return real(*args, **kwargs)
    return writer


def assert_resume_is_exact(tmp_path, tiny_flux, subject_dir, name: str, steps: int = 4):
    run(tiny_config(tmp_path, tiny_flux, subject_dir, name="ref", train={"steps": steps, "checkpoint_every": 1}),
        warn=lambda m: None)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": steps, "checkpoint_every": 1})
    assert "error" not in run(cfg, resume=True, warn=lambda m: None)[0]
    a = load_file(str(tmp_path / "runs/ref/lora/adapter.safetensors"))
    b = load_file(str(tmp_path / f"runs/{name}/lora/adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["RuntimeError", "SafetensorError"])
def test_checkpoint_write_failure_of_any_kind_stops_clearly(tmp_path, tiny_flux, subject_dir, monkeypatch, kind):
    import fluxlora.checkpoint as C

    where = "torch" if kind == "RuntimeError" else "save_file"
    if where == "torch":
        monkeypatch.setattr(C.torch, "save", failing_on(2, FULL[kind], torch.save))
    else:
        monkeypatch.setattr(C, "save_file", failing_on(2, FULL[kind], C.save_file))
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name="cut", train={"steps": 4, "checkpoint_every": 1})
    result = run(cfg, warn=lambda m: None)[0]
    assert "could not write checkpoint" in result["error"] and "previous checkpoint is kept" in result["error"]
    arm = GroupDir(tmp_path / "runs" / "cut").arm("lora")
    assert arm.status()["status"] == "failed" and [p.name for p in arm.checkpoints()] == ["step-000001"]
    assert not [p for p in arm.checkpoints_dir.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.undo()
    assert_resume_is_exact(tmp_path, tiny_flux, subject_dir, "cut")


def test_sample_and_metrics_write_failures_stop_clearly(tmp_path, tiny_flux, subject_dir, monkeypatch):
    from fluxlora import sampling
    from fluxlora.rundir import ArmDir

    monkeypatch.setattr(sampling, "write_json", failing_on(2, FULL["OSError"], sampling.write_json))
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name="cut", train={"steps": 4, "checkpoint_every": 1},
                      sample={"every": 2})
    result = run(cfg, warn=lambda m: None)[0]
    arm = GroupDir(tmp_path / "runs" / "cut").arm("lora")
    assert "could not write the step-2 samples" in result["error"] and "--resume" in result["error"]
    assert arm.status()["status"] == "failed" and arm.sample_steps() == [0]
    assert not [p for p in arm.samples_dir.iterdir() if p.name.startswith(".tmp")]  # no partial step folder
    monkeypatch.undo()
    monkeypatch.setattr(ArmDir, "log_metrics", failing_on(3, FULL["OSError"], ArmDir.log_metrics))
    metrics = tiny_config(tmp_path, tiny_flux, subject_dir, name="m", train={"steps": 4, "checkpoint_every": 1})
    result = run(metrics, warn=lambda m: None)[0]
    assert "could not write" in result["error"] and "metrics.jsonl" in result["error"]
    assert GroupDir(tmp_path / "runs" / "m").arm("lora").status()["status"] == "failed"


def test_export_failure_of_any_kind_and_temp_files_of_a_killed_export(tmp_path, tiny_flux, subject_dir,
                                                                      monkeypatch):
    import fluxlora.export as E

    monkeypatch.setattr(E, "save_file", failing_on(1, FULL["SafetensorError"], E.save_file))
    result = run(tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2}), warn=lambda m: None)[0]
    assert "could not write" in result["error"] and "the final checkpoint is kept" in result["error"]
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora")
    assert arm.status()["status"] == "failed" and not list(arm.root.glob("*.safetensors"))
    monkeypatch.undo()
    (arm.root / ".export-killed.tmp").write_bytes(b"half a file")  # what a kill -9 mid-export leaves
    (arm.root / ".export-killeddir").mkdir()
    arm.set_status("interrupted")
    assert "error" not in run(tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2}), resume=True,
                              warn=lambda m: None)[0]
    assert arm.adapter_file.is_file() and not list(arm.root.glob(".export-*"))
