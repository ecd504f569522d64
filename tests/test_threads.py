"""The CPU thread policy (fluxlora/threads.py): processes that share the machine split its cores."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from fluxlora import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_policy_never_exceeds_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 8)
    assert threads.for_launched_training() == 7
    assert threads.for_generation(training_beside=True) + threads.for_launched_training() == 8
    assert threads.for_generation(training_beside=False) == 8
    assert threads.for_generation(True, configured=3) == 3
    monkeypatch.setattr(threads, "cores", lambda: 1)
    assert threads.for_launched_training() == 1 and threads.for_generation(True) == 1


def test_threads_flag_sets_torch_threads(tmp_path, tiny_flux, subject_dir, restore_threads):
    import yaml

    from conftest import tiny_config
    from fluxlora.cli import main

    torch.set_num_threads(2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, tiny_flux, subject_dir).model_dump(mode="json")))
    assert main(["train", str(path), "--dry-run", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


def test_launched_training_gets_the_cores_but_one_and_finished_jobs_are_reaped(tmp_path, monkeypatch):
    from webui.jobs import Jobs

    seen = []
    real = subprocess.Popen

    def fake(cmd, **kw):
        seen.append(cmd)
        return real([sys.executable, "-c", "pass"], **kw)

    monkeypatch.setattr(subprocess, "Popen", fake)
    (tmp_path / "job").mkdir()
    jobs = Jobs(tmp_path)
    proc = jobs.start("job", tmp_path / "job" / "config.yaml")
    assert seen[0][-2:] == ["--threads", str(threads.for_launched_training())]
    deadline = time.monotonic() + 30
    while jobs.any_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.returncode == 0  # polled: the finished child is reaped, not left a zombie
