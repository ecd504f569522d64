"""`fluxlora sweep`: run every cell of a sweep file as a normal run folder inside the sweep folder, skip
finished cells, resume interrupted ones, and rewrite the report after each cell.

    runs/<sweep>/
      sweep.json        the sweep file as read, its cells, progress (done, elapsed, ETA)
      report.md         tables (report.py), plots/*.png
      <cell>/           a run folder (rundir.py), e.g. lr0.001_rank4_seed0/
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fluxlora.config import config_hash
from fluxlora.config_errors import ConfigError
from fluxlora.errors import RunError
from fluxlora.rundir import SWEEP_STATE as STATE
from fluxlora.rundir import GroupDir, read_json, write_json
from fluxlora.sweep_config import Cell, SweepConfig, cell_config, cells, folder, load_config, load_sweep


def plan(sweep: SweepConfig) -> tuple[Path, list[tuple[Cell, object]]]:
    """The sweep folder and every cell with its resolved run config, all checked before anything trains
    (a bad value in the grid is named with its cell)."""
    root = folder(sweep, load_config(sweep.config))
    out = []
    for cell in cells(sweep):
        try:
            out.append((cell, cell_config(sweep, root, cell)))
        except ConfigError as e:
            raise ConfigError(f"{e.source} in sweep cell {cell.name}", e.problems) from None
    return root, out


def cell_state(cell_root: Path, cfg) -> str:
    """new | done | partial (started: resume it). A folder holding another config is refused."""
    group = GroupDir(cell_root)
    info = group.info()
    if not info:
        return "new"
    if info.get("config_hash") != config_hash(cfg) and not _same_settings(group, cfg):
        raise RunError(f"{cell_root} was trained with another config than the sweep now gives it -> fix: give "
                       "the sweep a new name, or delete that cell folder to train it again")
    arms = [group.arm(a).status().get("status") for a in cfg.adapter.arms]
    return "done" if info.get("status") == "done" and all(s == "done" for s in arms) else "partial"


def _same_settings(group: GroupDir, cfg) -> bool:
    """Whether the cell folder's config.yaml is ``cfg`` up to ``train.resume`` (a resumed run records
    'latest' there: the same run, continued)."""
    try:
        stored = load_config(group.config_file).model_dump()
    except ConfigError:
        return False
    wanted = cfg.model_dump()
    stored["train"]["resume"] = wanted["train"]["resume"] = None
    return stored == wanted


def write_state(root: Path, sweep: SweepConfig, planned, started: float, times: list[float],
                status: str | None) -> int:
    """sweep.json from what is on disk (other workers' cells count too); returns the cells done. Status None:
    "done" when every cell is, else "incomplete"."""
    done = sum(cell_state(root / c.name, cfg) == "done" for c, cfg in planned)
    status = status or ("done" if done == len(planned) else "incomplete")
    eta = (len(planned) - done) * sum(times) / len(times) if times else None
    write_json(root / STATE, {"name": sweep.name, "sweep": sweep.model_dump(mode="json"), "status": status,
                              "cells": [{"name": c.name, "values": c.values} for c, _ in planned],
                              "done": done, "total": len(planned), "updated": time.time(),
                              "elapsed_s": time.time() - started, "eta_s": eta,
                              "created": (read_json(root / STATE, {}) or {}).get("created", started)})
    return done


def busy(cell_root: Path) -> bool:
    """Whether another live process (a second `fluxlora sweep` of the same file) is training this cell."""
    from fluxlora.runner import lock_holder

    pid = lock_holder(cell_root)
    return pid is not None and pid != os.getpid()


def _train_cell(cell_root: Path, cfg, warn) -> bool | None:
    """Train (or resume) one cell; None when another worker has it, else whether every arm finished."""
    from fluxlora.runner import run, summary_table

    state = cell_state(cell_root, cfg)  # again: another worker may have finished or started it meanwhile
    if state == "done" or busy(cell_root):
        return None if state != "done" else True
    try:
        results = run(cfg, resume=state == "partial", warn=warn)
    except RunError:
        if busy(cell_root):  # lost the race for its lock
            return None
        raise
    warn(summary_table(results))
    if any("error" in r for r in results):
        warn(f"sweep cell {cell_root.name}: an arm failed (see {cell_root}); rerun the sweep to retry it")
        return False
    return True


def run_sweep(path: str | Path, warn=print) -> Path:
    """Train every cell (a cell's arms share one loaded base, as in `fluxlora train`); returns the folder.
    Several processes may run the same sweep at once (e.g. one per GPU): each skips the cells another has."""
    from tqdm.auto import tqdm

    from fluxlora import report

    sweep = load_sweep(path)
    root, planned = plan(sweep)
    states = {c.name: cell_state(root / c.name, cfg) for c, cfg in planned}
    root.mkdir(parents=True, exist_ok=True)
    started, times = time.time(), []
    done = write_state(root, sweep, planned, started, times, "running")
    bar = tqdm(total=len(planned), initial=done, desc=f"sweep {sweep.name}", unit="cell", dynamic_ncols=True)
    try:
        for cell, cfg in planned:
            if states[cell.name] == "done":
                continue
            bar.set_postfix_str(cell.name)
            t0 = time.time()
            if _train_cell(root / cell.name, cfg, warn) is None:
                warn(f"sweep cell {cell.name}: another process is training it; skipped")
                continue
            times.append(time.time() - t0)
            done = write_state(root, sweep, planned, started, times, "running")
            bar.n = done
            bar.refresh()
            report.write(root)
    except KeyboardInterrupt:
        write_state(root, sweep, planned, started, times, "interrupted")
        raise
    finally:
        bar.close()
    write_state(root, sweep, planned, started, times, None)
    report.write(root)
    return root


def dry_run(path: str | Path) -> int:
    """List the cells and what is on disk for each; trains nothing."""
    sweep = load_sweep(path)
    root, planned = plan(sweep)
    arms = len(planned[0][1].adapter.arms)
    print(f"sweep {sweep.name}: {len(planned)} cells x {arms} arm{'s' if arms > 1 else ''} into {root}")
    for cell, cfg in planned:
        print(f"  {cell.name:<40} {cell_state(root / cell.name, cfg)}")
    return 0

