"""A sweep's report: per metric and step mean +- sd over seeds, and each arm at its own best value of the
chosen field (chosen on the selection metric, which the result columns never include). Reads run folders
only; imports no torch. The plots are drawn by report_plots.py."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fluxlora import metric_info
from fluxlora.rundir import SWEEP_STATE, GroupDir, read_json

REPORT = "report.md"


@dataclass
class ArmRun:
    """One arm of one cell: its grid values, metric series (step -> value) and final values."""
    cell: str
    arm: str
    values: dict
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def final(self, metric: str) -> float | None:
        if metric == "final_loss":
            return self.summary.get("final_loss")
        points = self.series.get(metric)
        return points[max(points)] if points else None


def collect(root: Path) -> tuple[dict, list[ArmRun]]:
    """sweep.json and every finished arm of its cells."""
    state = read_json(Path(root) / SWEEP_STATE, {}) or {}
    runs = []
    for cell in state.get("cells", []):
        for arm in GroupDir(Path(root) / cell["name"]).arms():
            status = arm.status()
            if status.get("status") != "done":
                continue
            run = ArmRun(cell["name"], arm.name, cell["values"], summary=status.get("summary", {}))
            for record in arm.metrics():
                for key in metric_info.scores(record):
                    if key != "loss" and record.get(key) is not None:  # per-step training loss: the summary's
                        run.series.setdefault(key, {})[record["step"]] = float(record[key])
            runs.append(run)
    return state, runs


def mean_sd(values: list[float]) -> tuple[float, float | None, int]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def setting(run: ArmRun, drop: tuple) -> tuple:
    """The arm and its grid values without the fields in ``drop`` (seeds, the chosen field)."""
    return (run.arm, *((k, _hashable(v)) for k, v in run.values.items() if k not in drop))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def by_setting(runs: list[ArmRun], drop: tuple) -> dict[tuple, list[ArmRun]]:
    out: dict[tuple, list[ArmRun]] = defaultdict(list)
    for r in runs:
        out[setting(r, drop)].append(r)
    return dict(out)


def choose(runs: list[ArmRun], seeds: str | None, chosen: str | None, on: str,
           counts: dict | None = None) -> dict[tuple, list[ArmRun]]:
    """Per arm and remaining setting: the seeds of its best value of ``chosen`` by the mean final ``on``, among the
    values that have the most seeds finished (a partial sweep never compares a 2-seed mean with a 1-seed one).
    ``counts``, when given, receives per key (values compared, values of ``chosen`` any arm has)."""
    drop = tuple(k for k in (seeds, chosen) if k)
    offered = len({_hashable(r.values.get(chosen)) for r in runs}) if chosen else 1
    best = {}
    for key, group in by_setting(runs, drop).items():
        options = by_setting(group, (seeds,) if seeds else ())
        most = max(len(v) for v in options.values())  # while a sweep runs: compare only values with every seed
        scored = [(mean_sd(v)[0], opt) for opt, opt_runs in options.items()
                  if len(opt_runs) == most and (v := [x for r in opt_runs if (x := r.final(on)) is not None])]
        if not scored:
            continue
        pick = scored[0]
        for cand in scored[1:]:
            if metric_info.better(on, cand[0], pick[0]):
                pick = cand
        best[key] = options[pick[1]]
        if counts is not None:
            counts[key] = (len(scored), offered)
    return best


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m, sd, n = mean_sd(values)
    return f"{m:.4g}" if sd is None else f"{m:.4g} ± {sd:.2g}"


def finals(runs: list[ArmRun], metric: str) -> list[float]:
    return [x for r in runs if (x := r.final(metric)) is not None]


def result_metrics(runs: list[ArmRun], wanted: list[str] | None, on: str) -> list[str]:
    logged = {k for r in runs for k in r.series} | {"final_loss"}
    return [k for k in wanted or metric_info.scores(logged) if k != on and k != "loss"]


def _label(key: tuple) -> tuple[str, list[str]]:
    return key[0], [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in key[1:]]


def headline(best: dict[tuple, list[ArmRun]], chosen: str | None, on: str, metrics: list[str],
             counts: dict | None = None) -> list[str]:
    """The markdown table: each arm at its own best value of ``chosen``; "(k of n)" after a value chosen among
    fewer values than other arms had (``counts`` from choose: an arm whose runs are not all in yet)."""
    pick = chosen.rsplit(".", 1)[-1] if chosen else None
    head = ["arm", "setting", *([f"best {pick}"] if pick else []), "seeds", f"{on} (selection)",
            *[f"{m} ({'↑' if metric_info.METRICS.get(m, metric_info.METRICS['loss']).higher_is_better else '↓'})"
              for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, runs in sorted(best.items(), key=lambda kv: (kv[0][1:], kv[0][0])):
        arm, rest = _label(key)
        k, n = (counts or {}).get(key, (1, 1))
        value = [f"{runs[0].values[chosen]}" + (f" ({k} of {n})" if k < n else "")] if pick else []
        cells = [arm, ", ".join(rest) or "-", *value, str(len(runs)),
                 fmt(finals(runs, on)), *[fmt(finals(runs, m)) for m in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def every_setting(runs: list[ArmRun], seeds: str | None, metrics: list[str], on: str) -> list[str]:
    """The appendix: every arm and setting, mean +- sd over seeds of the final values."""
    head = ["arm", "setting", "seeds", on, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in sorted(by_setting(runs, (seeds,) if seeds else ()).items(), key=lambda kv: (kv[0][1:], kv[0][0])):
        arm, rest = _label(key)
        lines.append("| " + " | ".join([arm, ", ".join(rest) or "-", str(len(group)), fmt(finals(group, on)),
                                        *[fmt(finals(group, m)) for m in metrics]]) + " |")
    return lines


def _wall(state: dict) -> str:
    s = state.get("elapsed_s")
    return "-" if s is None else f"{s / 60:.1f} min in the last invocation"


def _parts(state: dict) -> list[str]:
    """A study's lines naming its parts (study.py): which sweep each arm comes from."""
    parts = state.get("parts")
    if not parts:
        return []
    lines = [f"- `{p['name']}` ({p['folder']}): arms {', '.join(p['arms'])}; {p['done']} / {p['total']} cells done"
             for p in parts]
    return ["A study of several sweeps on one grid; each cell's configs were checked to differ only in their arms.",
            "", *lines, ""]


def render(root: Path, state: dict, runs: list[ArmRun], best: dict[tuple, list[ArmRun]], metrics: list[str],
           plots: list[str], counts: dict | None = None) -> str:
    """report.md's text: ``best`` from choose(), ``metrics`` the result columns."""
    r = state.get("sweep", {}).get("report", {})
    seeds, chosen, on = r.get("seeds"), r.get("choose"), r.get("by", "val_loss_subject")
    rule = f"`{chosen}` chosen per arm on the mean final `{on}` over seeds" if chosen else "no field chosen"
    kind, cells = ("Study", "Part cells") if state.get("parts") else ("Sweep", "Cells")
    out = [f"# {kind} {state.get('name', Path(root).name)}", "",
           f"{cells} done: {state.get('done', 0)} / {state.get('total', '?')} (status {state.get('status', '?')}; "
           f"wall {_wall(state)}). Arms finished: {len(runs)}. Values: mean ± sd over `{seeds}`.", "",
           *_parts(state),
           "## Each arm at its own best value", "", f"{rule}; the result columns are other metrics "
           "(↑ higher is better, ↓ lower is better). A value followed by (k of n) was chosen among k of the n "
           "values, the others lacking seeds so far.", "", *headline(best, chosen, on, metrics, counts), "",
           "## Plots", "", *[f"![{p}](plots/{p})" for p in plots], "",
           "## Every setting (final values)", "", *every_setting(runs, seeds, metrics, on), ""]
    return "\n".join(out)


def write(root: Path) -> Path:
    """(Re)write a sweep's report.md and plots/ from what is on disk; returns the report's path."""
    state, runs = collect(Path(root))
    return publish(Path(root), state, runs)


def publish(root: Path, state: dict, runs: list[ArmRun]) -> Path:
    """report.md and plots/ in ``root`` for ``runs`` (one sweep's, or a study's parts'), with the choice rule
    of ``state["sweep"]["report"]``."""
    from fluxlora import report_plots

    r = state.get("sweep", {}).get("report", {})
    on = r.get("by", "val_loss_subject")
    counts: dict = {}
    best = choose(runs, r.get("seeds"), r.get("choose"), on, counts)
    metrics = result_metrics(runs, r.get("metrics"), on)
    plots = report_plots.draw(root / "plots", runs, best, r.get("seeds"), r.get("choose"), [on, *metrics])
    path = root / REPORT
    tmp = path.with_name(f".{REPORT}.{os.getpid()}.tmp")
    tmp.write_text(render(root, state, runs, best, metrics, plots, counts), encoding="utf-8")
    os.replace(tmp, path)
    return path
