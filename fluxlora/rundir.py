"""The run directory contract (an API: the web UI, export and resume read it). Imports no torch.

    runs/<name>/                  one training invocation ("group")
      group.json                  arms, config hash, created, status per arm
      config.yaml                 resolved config
      <arm>/
        status.json               queued|running|done|failed, step, total, pid, error
        metrics.jsonl             one JSON object per logged step
        init.json                 init method, time taken, trainable params, per-layer stats
        samples/step-000500/      grid.png + NN.png + meta.json
        checkpoints/step-000500/  full trainer state (written as tmp, then renamed)
        adapter.safetensors       final export, one file per format (formats.py; diffusers here)
        adapter_comfyui.safetensors
        exports/step-000200/      files exported from an earlier checkpoint (fluxlora export --step 200)
    runs/<sweep>/                 a sweep (sweep.py): sweep.json, report.md, plots/, one run folder per cell
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fluxlora.formats import FORMATS

def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


class ArmDir:
    """Paths and small writers of one arm's folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def name(self) -> str:
        return self.root.name

    status_file = property(lambda self: self.root / "status.json")
    metrics_file = property(lambda self: self.root / "metrics.jsonl")
    init_file = property(lambda self: self.root / "init.json")
    adapter_file = property(lambda self: self.root / FORMATS["diffusers"].file_name)  # what sample/bench load
    samples_dir = property(lambda self: self.root / "samples")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")

    def export_file(self, fmt: str, rank: int | None = None) -> Path:
        return self.root / FORMATS[fmt].file_for(rank)

    def export_files(self) -> list[tuple[str, Path]]:
        """(format, file) of every exported adapter file at full rank that exists."""
        return [(fmt, self.export_file(fmt)) for fmt in FORMATS if self.export_file(fmt).is_file()]

    exports_dir = property(lambda self: self.root / "exports")

    def step_export(self, step: int) -> "ArmDir":
        """Where the files exported from the checkpoint of ``step`` go (`fluxlora export --step`)."""
        return ArmDir(self.exports_dir / step_name(step))

    def step_exports(self) -> list[tuple[int, str, Path]]:
        """(step, format, file) of every exported checkpoint step, oldest first."""
        if not self.exports_dir.is_dir():
            return []
        steps = sorted(int(p.name[5:]) for p in self.exports_dir.glob("step-*") if p.name[5:].isdigit())
        return [(s, fmt, path) for s in steps for fmt, path in self.step_export(s).export_files()]

    def checkpoint_steps(self) -> list[int]:
        return [int(p.name[5:]) for p in self.checkpoints()]

    def create(self) -> "ArmDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def set_status(self, status: str, **fields) -> None:
        current = read_json(self.status_file, {}) or {}
        current.update(fields, status=status, updated=time.time())
        write_json(self.status_file, current)

    def status(self) -> dict:
        return read_json(self.status_file, {}) or {}

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        """All logged records; a torn last line (crash mid-write) is ignored."""
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past ``after_step`` (all of them for 0, since step 0 is redone) on resume, so
        the log has no duplicated steps."""
        if not self.metrics_file.exists():
            return
        keep = [r for r in self.metrics() if after_step > 0 and r.get("step", 0) <= after_step]
        tmp = self.metrics_file.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.metrics_file)

    def sample_steps(self) -> list[int]:
        if not self.samples_dir.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.samples_dir.glob("step-*") if (p / "meta.json").exists())

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a complete one has its state.json written last)."""
        if not self.checkpoints_dir.exists():
            return []
        done = [p for p in self.checkpoints_dir.glob("step-*") if (p / "state.json").exists()]
        return sorted(done, key=lambda p: p.name)


class GroupDir:
    """A training invocation: group.json, config.yaml and one ArmDir per arm."""

    def __init__(self, root: Path):
        self.root = Path(root)

    group_file = property(lambda self: self.root / "group.json")
    config_file = property(lambda self: self.root / "config.yaml")

    def arm(self, name: str) -> ArmDir:
        return ArmDir(self.root / name)

    def info(self) -> dict:
        return read_json(self.group_file, {}) or {}

    def arms(self) -> list[ArmDir]:
        return [self.arm(a) for a in self.info().get("arms", [])]

    def write_info(self, **fields) -> None:
        info = self.info()
        info.update(fields)
        write_json(self.group_file, info)


SWEEP_STATE = "sweep.json"  # marks a sweep folder (sweep.py): its cells are run folders one level down


def _runs_in(folder: Path) -> list[GroupDir]:
    return [GroupDir(p) for p in folder.iterdir() if (p / "group.json").exists()]


def list_groups(runs: Path) -> list[GroupDir]:
    """Every run folder in ``runs``, including the cells of its sweeps, ordered by label."""
    runs = Path(runs)
    if not runs.is_dir():
        return []
    found = _runs_in(runs)
    for sweep in list_sweeps(runs):
        found += _runs_in(sweep)
    return sorted(found, key=lambda g: group_label(runs, g))


def group_label(runs: Path, group: GroupDir) -> str:
    """A run's name in ``runs``: its folder name, or ``<sweep>/<cell>`` for a sweep's cell."""
    return group.root.relative_to(Path(runs)).as_posix()


def list_sweeps(runs: Path) -> list[Path]:
    runs = Path(runs)
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if (p / SWEEP_STATE).exists())
