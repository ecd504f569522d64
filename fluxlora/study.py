"""A study: several sweeps on one grid and one run config, each adding arms, reported as one comparison
(`fluxlora sweep study.yaml`). Arms added later (a new init) join the earlier arms' cells without those
being trained again. That is fair only when every cell of every part is the same run but for its arms:
checked here on the configs the cells were trained with (or will be), before anything trains. The data
order, sigmas, noise and evaluation tuples of a cell depend on its config and train.seed, not on which
arms share it (docs/design.md decision 5; docs/sweeps.md, "Studies").

    name: toy_study_all
    parts: [sweeps/toy_study.yaml, sweeps/toy_study_data.yaml]   # same grid, same config, other arms
    report: {seeds: train.seed, choose: train.lr, by: val_loss_subject}
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError

from fluxlora import report
from fluxlora import sweep as sweeps
from fluxlora.config import load_config
from fluxlora.config_base import Section
from fluxlora.config_errors import ConfigError, Problem, problems_from
from fluxlora.rundir import SWEEP_STATE, GroupDir, read_json, write_json
from fluxlora.sweep_config import Cell, ReportConfig, SweepConfig, load_sweep, read_document

# What may differ between the parts' configs of one cell: the arms (and their per-arm overrides), the
# folder the sweep gives the cell, the resume marker a resumed cell records, and the settings tests show
# leave every result bit for bit the same (block swap: tests/test_block_swap.py; the data pass's memory
# budget: tests/test_initpass.py), so a later part may run on a smaller machine.
ARM_FIELDS = ("name", "output_dir", "adapter.init", "adapter.overrides", "train.resume", "train.blocks_to_swap",
              "adapter.init_pass_gb")


class StudyConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="study folder name")
    parts: list[str] = Field(min_length=2, description="sweep files (paths from the working directory) on the "
                             "same grid and run config, each with its own arms; trained in this order")
    output_dir: str | None = Field(None, description="where the study folder goes, a path from the working "
                                   "directory (default: beside the first part's sweep folder)")
    report: ReportConfig = Field(default_factory=ReportConfig)


@dataclass
class Part:
    path: str
    sweep: SweepConfig
    root: Path
    planned: list[tuple[Cell, object]]  # (cell, its RunConfig)

    @property
    def arms(self) -> list[str]:
        return list(self.planned[0][1].adapter.arms)


def is_study(path: str | Path) -> bool:
    """Whether a sweep-command file is a study (it names parts) rather than a sweep."""
    return "parts" in read_document(path)


def load_study(path: str | Path) -> StudyConfig:
    try:
        study = StudyConfig.model_validate(read_document(path))
    except ValidationError as e:
        raise ConfigError(str(path), problems_from(StudyConfig, e)) from None
    return study


def plan(path: str | Path) -> tuple[StudyConfig, Path, list[Part]]:
    """The study, its folder and its parts, every comparability rule checked (ConfigError naming the part,
    cell and field otherwise); trains nothing."""
    study = load_study(path)
    parts = []
    for p in study.parts:
        sweep = load_sweep(p)
        root, planned = sweeps.plan(sweep)
        parts.append(Part(p, sweep, root, planned))
    root = Path(study.output_dir or parts[0].root.parent) / study.name
    problems = (_folder_problems(root, parts) or _grid_problems(parts) or _report_problems(study, parts[0].sweep)
                or _arm_problems(parts) or _config_problems(parts))
    if problems:
        raise ConfigError(str(path), problems)
    return study, root, parts


def _folder_problems(root: Path, parts: list[Part]) -> list[Problem]:
    """The study folder and every part's sweep folder are distinct (a study writes its own sweep.json)."""
    seen: dict[Path, str] = {root.resolve(): "the study itself"}
    out = []
    for p in parts:
        where = p.root.resolve()
        if where in seen:
            out.append(Problem(f"{p.path}: name", p.sweep.name, f"its folder {p.root} is also {seen[where]}'s",
                               "give every part and the study its own name"))
        seen.setdefault(where, p.path)
    return out


def _grid_problems(parts: list[Part]) -> list[Problem]:
    """Identical grids, field order included: cells are then the same names in the same order."""
    first = parts[0]
    return [Problem(f"{p.path}: grid", None, f"differs from {first.path}'s grid ({p.sweep.grid} vs "
                    f"{first.sweep.grid})", "give every part the same grid fields and values, in the same order")
            for p in parts[1:] if list(p.sweep.grid.items()) != list(first.sweep.grid.items())]


def _report_problems(study: StudyConfig, first: SweepConfig) -> list[Problem]:
    """Report fields the study file leaves unset take the first part's; seeds / choose must be grid fields."""
    for key in ReportConfig.model_fields:
        if key not in study.report.model_fields_set:
            setattr(study.report, key, getattr(first.report, key))
    return [Problem(f"report.{role}", key, "not a grid field of the parts", f"use one of {list(first.grid)} or null")
            for role in ("seeds", "choose") if (key := getattr(study.report, role)) is not None
            and key not in first.grid]


def _arm_problems(parts: list[Part]) -> list[Problem]:
    """Each arm in one part, and every trained cell holds exactly the arms its part lists now (a sweep file
    edited after training would otherwise mix or hide arms)."""
    seen: dict[str, str] = {}
    out = []
    for p in parts:
        for arm in p.arms:
            if arm in seen:
                out.append(Problem(f"{p.path}: adapter.init", arm, f"this arm is also in {seen[arm]}",
                                   "each arm belongs to one part; drop it from one of them"))
            seen.setdefault(arm, p.path)
        for cell, _ in p.planned:
            stored = GroupDir(p.root / cell.name).info().get("arms")
            if stored is not None and list(stored) != p.arms:
                out.append(Problem(f"{p.path}: cell {cell.name}", None, f"was trained with arms {stored}, the "
                                   f"sweep file now lists {p.arms}", "list the arms it was trained with, or "
                                   "put the new arms in a new part"))
                break
    return out


def _trained_config(part: Part, cell: Cell, planned):
    """The config a cell was trained with (its config.yaml), or the one it will be trained with."""
    stored = GroupDir(part.root / cell.name).config_file
    return load_config(stored) if stored.is_file() else planned


def comparable(cfg) -> dict[str, object]:
    """A run config as dotted field -> value, without the fields a part may set for its own arms."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if prefix[:-1] in ARM_FIELDS:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", cfg.model_dump(mode="json"))
    return flat


def _config_problems(parts: list[Part]) -> list[Problem]:
    """One problem per part whose cells differ from the first part's in more than their arms: the first such
    cell and field, and how many cells differ."""
    out = []
    refs = [comparable(_trained_config(parts[0], cell, cfg)) for cell, cfg in parts[0].planned]
    for p in parts[1:]:
        bad = []
        for ref, (cell, cfg) in zip(refs, p.planned):
            other = comparable(_trained_config(p, cell, cfg))
            if diff := sorted(k for k in ref.keys() | other.keys() if ref.get(k) != other.get(k)):
                bad.append((cell, diff[0], ref.get(diff[0]), other.get(diff[0]), len(diff)))
        if bad:
            cell, key, mine, theirs, n = bad[0]
            out.append(Problem(f"cell {cell.name}: {key}", None, f"{parts[0].path} has {mine!r}, {p.path} has "
                               f"{theirs!r} ({n} field{'s' * (n > 1)} differ here; {len(bad)} of "
                               f"{len(refs)} cells differ)", "set it the same in every part (only the arms may "
                               "differ), or make the part a new sweep under another name"))
    return out


def write(study: StudyConfig, root: Path, parts: list[Part]) -> Path:
    """The study's sweep.json (the web UI lists it beside the sweeps) and its report over every part's arms."""
    states = [read_json(p.root / SWEEP_STATE, {}) or {} for p in parts]
    runs = [run for p in parts for run in report.collect(p.root)[1]]
    done, total = sum(s.get("done", 0) for s in states), sum(len(p.planned) for p in parts)
    state = {"name": study.name, "sweep": {"report": study.report.model_dump(mode="json")},
             "status": "done" if done == total else "incomplete", "done": done, "total": total, "cells": [],
             "updated": time.time(), "parts": [{"name": p.sweep.name, "folder": str(p.root), "arms": p.arms,
                                                "done": s.get("done", 0), "total": len(p.planned)}
                                               for p, s in zip(parts, states)]}
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / SWEEP_STATE, state)
    return report.publish(root, state, runs)


def run_study(path: str | Path, warn=print) -> Path:
    """Check the parts, train each part's cells (finished ones are skipped), then write the joint report."""
    study, root, parts = plan(path)
    for part in parts:
        sweeps.run_sweep(part.path, warn=warn)
    write(*plan(path))  # planned again: the configs are checked on what the cells were trained with
    return root


def dry_run(path: str | Path) -> int:
    """The parts, their arms and how many cells of each are done; trains nothing."""
    study, root, parts = plan(path)
    print(f"study {study.name}: {len(parts)} parts on {len(parts[0].planned)} cells into {root}; configs comparable")
    for p in parts:
        states = [sweeps.cell_state(p.root / c.name, cfg) for c, cfg in p.planned]
        print(f"  {p.sweep.name:<28} arms {', '.join(p.arms):<32} {states.count('done')} / {len(states)} cells done")
    return 0
