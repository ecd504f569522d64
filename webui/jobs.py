"""Trainings started from the web UI, owned by the server through a job table in the runs folder
(``<runs>/.uploads/jobs.json``, never served): every page, and a restarted server, sees the running jobs and
can cancel them; an interrupted one can be resumed. A job is `fluxlora train <config>` as a subprocess in its
own session (its log: ``<runs>/.uploads/<name>/train.log``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fluxlora.rundir import GroupDir, pid_alive, read_json, write_json
from webui.launch import UPLOADS, collapse_progress

TABLE = "jobs.json"


def _is_training_of(pid: int, config: str) -> bool:
    """Whether ``pid`` is still our `fluxlora train <config>` (not a recycled pid of something else). A process
    that is exiting has an empty command line for a moment before it becomes a zombie: still running."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return pid_alive(pid)  # no /proc: trust the pid
    if state in ("Z", "X"):
        return False
    args = cmdline.split(b"\0")
    return not cmdline or (config.encode() in args and b"train" in args)


class Jobs:
    """`fluxlora train` subprocesses started from the web UI, by run name."""

    def __init__(self, runs: Path):
        self.runs = Path(runs)
        self.procs: dict[str, subprocess.Popen] = {}  # started by this server: polled, so none stays a zombie

    @property
    def table_file(self) -> Path:
        return self.runs / UPLOADS / TABLE

    def table(self) -> dict[str, dict]:
        return read_json(self.table_file, {}) or {}

    def _record(self, name: str, **fields) -> None:
        self.table_file.parent.mkdir(parents=True, exist_ok=True)
        table = self.table()
        table[name] = {**table.get(name, {}), **fields}
        write_json(self.table_file, table)

    def start(self, name: str, config: Path, resume: bool = False) -> subprocess.Popen:
        from fluxlora.threads import for_launched_training

        log = open(config.parent / "train.log", "ab")
        cmd = [sys.executable, "-m", "fluxlora.cli", "train", str(config), "--threads", str(for_launched_training())]
        proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=log, stderr=subprocess.STDOUT,
                                cwd=config.parent, start_new_session=True)
        log.close()
        self.procs[name] = proc
        self._record(name, pid=proc.pid, config=str(config), started=time.time())
        return proc

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            return proc.poll() is None  # poll() also reaps a finished process
        job = self.table().get(name)
        return bool(job) and pid_alive(job["pid"]) and _is_training_of(job["pid"], job["config"])

    def any_running(self) -> bool:
        """Whether a training launched from the UI still runs; reaps the finished ones (no zombies)."""
        return any([self.running(name) for name in self.table()])

    def state(self, name: str) -> str:
        """running | done | interrupted | failed, from the process and the run folder."""
        if self.running(name):
            return "running"
        status = GroupDir(self.runs / name).info().get("status")
        return status if status in ("done", "failed") else "interrupted"

    def rows(self) -> list[dict]:
        """The job table for display, newest first."""
        jobs = sorted(self.table().items(), key=lambda kv: kv[1].get("started", 0), reverse=True)
        return [{"job": name, "state": self.state(name),
                 "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(job.get("started", 0)))}
                for name, job in jobs]

    def log_tail(self, name: str, lines: int = 12) -> str:
        path = self.runs / UPLOADS / name / "train.log"
        if not path.exists():
            return ""
        text = path.read_bytes()[-20000:].decode("utf-8", "replace").replace("\r", "\n")
        return "\n".join(collapse_progress([ln for ln in text.splitlines() if ln.strip()])[-lines:])

    def _stop(self, name: str, grace: float) -> int | None:
        """SIGTERM (the trainer saves a checkpoint, exit 143), SIGKILL after ``grace`` s; the exit code when
        this server started it, else None."""
        proc, pid = self.procs.get(name), self.table()[name]["pid"]
        os.killpg(pid, signal.SIGTERM) if proc is None else proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running(name):
            os.killpg(pid, signal.SIGKILL)
            if proc is not None:
                proc.wait()
            raise TimeoutError
        return proc.returncode if proc is not None else None

    def cancel(self, name: str, grace: float = 60.0) -> str:
        """Stop a job, whichever page or server started it."""
        if name not in self.table() or not self.running(name):
            return f"{name} is not running"
        config = self.table()[name]["config"]
        try:
            code = self._stop(name, grace)
        except TimeoutError:
            return f"{name} did not stop within {grace:.0f} s and was killed; resume from its last checkpoint"
        exit_text = f" (exit {code})" if code is not None else ""
        return f"{name} stopped{exit_text}; press Resume, or run: fluxlora train {config} --resume"

    def resume(self, name: str) -> str:
        job = self.table().get(name)
        if job is None:
            return f"{name} was not launched from the web UI: resume it with fluxlora train CONFIG --resume"
        if self.running(name):
            return f"{name} is already running"
        if self.state(name) == "done":
            return f"{name} has finished: nothing to resume"
        self.start(name, Path(job["config"]), resume=True)
        return f"resumed **{name}** from its last checkpoints"

    def stop_all(self) -> None:
        """On server exit: stop the trainings this server started (others' keep running)."""
        for name in list(self.procs):
            if self.running(name):
                self.cancel(name, grace=10.0)
