"""`fluxlora sweep`: run every cell of a sweep file as a normal run folder inside the sweep folder, skip
finished cells, resume interrupted ones, and rewrite the report after each cell.

    runs/<sweep>/
      sweep.json        the sweep file as read, its cells, progress (done, elapsed, ETA)
      report.md         tables (report.py), plots/*.png
      <cell>/           a run folder (rundir.py), e.g. lr0.001_rank4_seed0/
"""

from __future__ import annotations

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
    if info.get("config_hash") != config_hash(cfg):
        raise RunError(f"{cell_root} was trained with another config than the sweep now gives it -> fix: give "
                       "the sweep a new name, or delete that cell folder to train it again")
    arms = [group.arm(a).status().get("status") for a in cfg.adapter.arms]
    return "done" if info.get("status") == "done" and all(s == "done" for s in arms) else "partial"


def write_state(root: Path, sweep: SweepConfig, planned, done: int, started: float, times: list[float],
                status: str) -> None:
    remaining = len(planned) - done
    eta = remaining * sum(times) / len(times) if times else None
    write_json(root / STATE, {"name": sweep.name, "sweep": sweep.model_dump(mode="json"), "status": status,
                              "cells": [{"name": c.name, "values": c.values} for c, _ in planned],
                              "done": done, "total": len(planned), "updated": time.time(),
                              "elapsed_s": time.time() - started, "eta_s": eta,
                              "created": (read_json(root / STATE, {}) or {}).get("created", started)})


def run_sweep(path: str | Path, warn=print) -> Path:
    """Train every cell (a cell's arms share one loaded base, as in `fluxlora train`); returns the folder."""
    from tqdm.auto import tqdm

    from fluxlora import report
    from fluxlora.runner import run, summary_table

    sweep = load_sweep(path)
    root, planned = plan(sweep)
    states = {c.name: cell_state(root / c.name, cfg) for c, cfg in planned}
    root.mkdir(parents=True, exist_ok=True)
    done, started, times = sum(s == "done" for s in states.values()), time.time(), []
    write_state(root, sweep, planned, done, started, times, "running")
    bar = tqdm(total=len(planned), initial=done, desc=f"sweep {sweep.name}", unit="cell", dynamic_ncols=True)
    try:
        for cell, cfg in planned:
            if states[cell.name] == "done":
                continue
            bar.set_postfix_str(cell.name)
            t0 = time.time()
            results = run(cfg, resume=states[cell.name] == "partial", warn=warn)
            warn(summary_table(results))
            if any("error" in r for r in results):
                warn(f"sweep cell {cell.name}: an arm failed (see {root / cell.name}); rerun the sweep to retry it")
            else:
                done += 1
            times.append(time.time() - t0)
            bar.update(1)
            write_state(root, sweep, planned, done, started, times, "running")
            report.write(root)
    except KeyboardInterrupt:
        write_state(root, sweep, planned, done, started, times, "interrupted")
        raise
    finally:
        bar.close()
    write_state(root, sweep, planned, done, started, times, "done" if done == len(planned) else "incomplete")
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

