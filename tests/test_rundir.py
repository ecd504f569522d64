"""The run-directory contract (read by the web UI and export without torch)."""

from __future__ import annotations

import subprocess
import sys

from fluxlora.rundir import ArmDir, GroupDir, list_groups, read_json, write_json


def test_rundir_imports_no_torch():
    code = "import sys, fluxlora.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_write_json_is_atomic_and_read_json_tolerates_missing(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind
    assert read_json(tmp_path / "missing.json", default={}) == {}


def test_metrics_ignore_a_torn_last_line_and_truncate(tmp_path):
    arm = ArmDir(tmp_path / "lora").create()
    for step in (1, 2, 3):
        arm.log_metrics({"step": step, "loss": 0.1 * step})
    with open(arm.metrics_file, "a") as f:
        f.write('{"step": 4, "lo')  # a crash in the middle of a write
    assert [r["step"] for r in arm.metrics()] == [1, 2, 3]
    arm.truncate_metrics(2)
    assert [r["step"] for r in arm.metrics()] == [1, 2]
    arm.truncate_metrics(0)
    assert arm.metrics() == []


def test_groups_listed_with_their_arms(tmp_path):
    for name in ("b_run", "a_run"):
        g = GroupDir(tmp_path / name)
        g.root.mkdir()
        g.write_info(arms=["lora", "loram"], status="done")
    (tmp_path / "not_a_run").mkdir()
    groups = list_groups(tmp_path)
    assert [g.root.name for g in groups] == ["a_run", "b_run"]
    assert [a.name for a in groups[0].arms()] == ["lora", "loram"]
    assert list_groups(tmp_path / "nope") == []
