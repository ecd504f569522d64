"""The sweep file (`fluxlora sweep sweep.yaml`): a run config, fixed overrides and a grid over any config
fields; every combination is one cell, a normal run folder. Reading and checking it imports no torch.

    name: toy_study
    config: train_configs/toy_subject.yaml   # the run config every cell starts from
    set: {adapter.init: [lora, pissa, loram]} # the same in every cell (the arms of one cell share a base)
    grid: {train.lr: [1.0e-4, 1.0e-3], train.seed: [0, 1, 2]}
    report: {seeds: train.seed, choose: train.lr, by: val_loss_subject}
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from fluxlora import metric_info
from fluxlora.config import RunConfig, load_config
from fluxlora.config_base import Section
from fluxlora.config_errors import ConfigError, Problem, problems_from
from fluxlora.yamlsafe import YamlProblem, load_yaml

OWNED = ("name", "output_dir")  # the sweep sets these per cell


class ReportConfig(Section):
    seeds: str | None = Field("train.seed", description="grid field whose values are repeats (mean +- sd); "
                              "default train.seed when the grid has it")
    choose: str | None = Field("train.lr", description="grid field chosen per arm: each arm at its own best value; "
                               "default train.lr when the grid has it")
    by: str = Field("val_loss_subject", description="metric the choice is made on (never reported as a result)")
    metrics: list[str] | None = Field(None, description="metrics to report (default: every score logged)")

    @model_validator(mode="after")
    def _known(self):
        if self.by not in metric_info.METRICS or metric_info.METRICS[self.by].higher_is_better is None:
            raise ValueError(f"report.by {self.by!r} is not a score fluxlora logs -> use one of "
                             f"{metric_info.scores(metric_info.METRICS)}")
        if self.metrics and self.by in self.metrics:
            raise ValueError(f"report.metrics lists {self.by}, the metric the choice is made on -> remove it: a "
                             "setting chosen on a metric says nothing honest about that metric")
        return self


class SweepConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="sweep folder name")
    config: str = Field(description="run config every cell starts from (path from the working directory)")
    output_dir: str | None = Field(None, description="where the sweep folder goes (default: the config's)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every cell")
    grid: dict[str, list[Any]] = Field(description="config field -> values; every combination is a cell")
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _fields(self):
        if not self.grid:
            raise ValueError("grid is empty -> name at least one field, e.g. grid: {train.lr: [1.0e-4, 1.0e-3]}")
        if empty := [k for k, v in self.grid.items() if not v]:
            raise ValueError(f"grid.{empty[0]} has no values -> give it a list of one or more")
        if owned := [k for k in (*self.grid, *self.set) if k in OWNED]:
            raise ValueError(f"{owned[0]} is set by the sweep for each cell -> remove it")
        if both := sorted(set(self.grid) & set(self.set)):
            raise ValueError(f"{both[0]} is both in set and in grid -> keep it in one")
        for role in ("seeds", "choose"):
            if role not in self.report.model_fields_set and getattr(self.report, role) not in self.grid:
                setattr(self.report, role, None)  # the default field is not in this grid: no seeds / no choice
            key = getattr(self.report, role)
            if key is not None and key not in self.grid:
                raise ValueError(f"report.{role} {key!r} is not a grid field -> use one of {list(self.grid)} or null")
        return self


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict[str, Any]  # grid field -> this cell's value


def _short(keys: list[str]) -> dict[str, str]:
    """The label of each grid field in cell names: its last part (``train.lr`` -> ``lr``) unless two share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last)}


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(_text, value))
    return re.sub(r"[^A-Za-z0-9.+-]", "", str(value)) or "x"


def cells(sweep: SweepConfig) -> list[Cell]:
    """Every combination of the grid, in the grid's order (the last field varies fastest)."""
    keys = list(sweep.grid)
    label = _short(keys)
    out = []
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        out.append(Cell("_".join(f"{label[k]}{_text(v)}" for k, v in values.items()), values))
    if len({c.name for c in out}) != len(out):
        raise ConfigError(sweep.name, [Problem("grid", None, "two cells get the same folder name",
                                               "make the values of each field distinct")])
    return out


def folder(sweep: SweepConfig, base: RunConfig) -> Path:
    return Path(sweep.output_dir or base.output_dir) / sweep.name


def overrides(sweep: SweepConfig, root: Path, cell: Cell) -> list[str]:
    """The key=value overrides that turn the base run config into this cell's (values as JSON, which is
    YAML)."""
    fixed = {**sweep.set, **cell.values, "output_dir": str(root), "name": cell.name}
    return [f"{k}={json.dumps(v)}" for k, v in fixed.items()]


def cell_config(sweep: SweepConfig, root: Path, cell: Cell) -> RunConfig:
    return load_config(sweep.config, overrides(sweep, root, cell))


def read_document(path: str | Path) -> dict:
    """A sweep or study file's YAML mapping (safe loading), its problems named with line and fix."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem(str(path), None, "sweep file not found", "check the path")]) from None
    except YamlProblem as e:
        raise ConfigError(str(path), [Problem(f"{path}:{e.line}:{e.column}", None, e.message, e.fix)]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), [Problem("(document)", None, "a sweep file is a mapping",
                                              "write name:, config:, grid: at top level")])
    return data


def load_sweep(path: str | Path) -> SweepConfig:
    try:
        return SweepConfig.model_validate(read_document(path))
    except ValidationError as e:
        raise ConfigError(str(path), problems_from(SweepConfig, e)) from None
