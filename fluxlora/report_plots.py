"""The sweep report's PNG plots (matplotlib, no display needed):

- ``<metric>_steps.png``: the metric over training steps, each arm at its own best value of the chosen
  field, mean over seeds with a +-sd band; one panel per remaining setting (e.g. per rank).
- ``<metric>_by_<field>.png``: the final value against every value of the chosen field (the sensitivity
  the choice was made from), mean +- sd over seeds; one panel per remaining setting.
"""

from __future__ import annotations

import os
from pathlib import Path

from fluxlora import metric_info
from fluxlora.report import ArmRun, by_setting, finals, mean_sd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _order(panel: tuple) -> tuple:
    """Numbers by value (rank 4 before rank 16), anything else by its text."""
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in panel)


def _panels(keys) -> list[tuple]:
    """The remaining settings (without the arm), one panel each, in a stable order."""
    return sorted({k[1:] for k in keys}, key=_order)


def _title(panel: tuple) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in panel) or "all"


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _band(ax, runs: list[ArmRun], metric: str, label: str) -> None:
    steps = sorted({s for r in runs for s in r.series.get(metric, {})})
    stats = [mean_sd([r.series[metric][s] for r in runs if s in r.series.get(metric, {})]) for s in steps]
    if not steps:
        return
    mean = [m for m, _, _ in stats]
    sd = [d or 0.0 for _, d, _ in stats]
    line, = ax.plot(steps, mean, marker="o", ms=3, label=label)
    ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                    color=line.get_color(), alpha=0.15)


def _axes(plt, n: int):
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.4), squeeze=False, layout="constrained")
    return fig, axes[0]


def _ylabel(metric: str) -> str:
    m = metric_info.METRICS.get(metric)
    return f"{metric} ({m.arrow})" if m else metric


def _figure(out: Path, name: str, panels: list[tuple], draw_panel, xlabel: str, metric: str) -> str:
    """One PNG with a panel per remaining setting; ``draw_panel(ax, panel)`` draws its lines."""
    plt = _pyplot()
    fig, axes = _axes(plt, len(panels))
    for ax, panel in zip(axes, panels):
        draw_panel(ax, panel)
        ax.set(title=_title(panel), xlabel=xlabel, ylabel=_ylabel(metric))
        ax.grid(alpha=0.3)
    # many arms (labels, not lines: an error-bar series draws 3 lines): legends beside the panels, off the curves
    crowded = any(len(ax.get_legend_handles_labels()[1]) > 5 for ax in axes)
    for ax in axes:
        ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if crowded else {}))
    if crowded:
        fig.set_figwidth(6.6 * len(axes))  # room for the legends (constrained layout places them)
    _save(fig, out / name)
    plt.close(fig)
    return name


def steps_plot(out: Path, best: dict[tuple, list[ArmRun]], chosen: str | None, metric: str) -> str | None:
    if not any(metric in r.series for runs in best.values() for r in runs):
        return None

    def lines(ax, panel):
        for key, runs in sorted(best.items()):
            if key[1:] == panel:
                pick = f" @ {chosen.rsplit('.', 1)[-1]}={runs[0].values[chosen]}" if chosen else ""
                _band(ax, runs, metric, f"{key[0]}{pick}")

    return _figure(out, f"{metric}_steps.png", _panels(best), lines, "step", metric)


def sensitivity_plot(out: Path, runs: list[ArmRun], seeds: str | None, chosen: str, metric: str) -> str | None:
    groups = by_setting(runs, tuple(k for k in (seeds, chosen) if k))
    if not any(finals(g, metric) for g in groups.values()):
        return None

    def lines(ax, panel):
        for key, group in sorted(groups.items()):
            if key[1:] != panel:
                continue
            options = sorted(by_setting(group, (seeds,) if seeds else ()).values(), key=lambda g: g[0].values[chosen])
            points = [(g[0].values[chosen], mean_sd(v)) for g in options if (v := finals(g, metric))]
            xs = [x for x, _ in points]
            ax.errorbar(xs, [m for _, (m, _, _) in points], yerr=[sd or 0 for _, (_, sd, _) in points],
                        marker="o", ms=3, capsize=3, label=key[0])
            if all(isinstance(x, (int, float)) and x > 0 for x in xs):
                ax.set_xscale("log")

    return _figure(out, f"{metric}_by_{chosen.rsplit('.', 1)[-1]}.png", _panels(groups), lines, chosen, metric)


def draw(out: Path, runs: list[ArmRun], best: dict, seeds: str | None, chosen: str | None,
         metrics: list[str]) -> list[str]:
    """Every plot for ``metrics``; returns the file names written into ``out``."""
    if not runs:
        return []
    out.mkdir(parents=True, exist_ok=True)
    names = [steps_plot(out, best, chosen, m) for m in metrics]
    if chosen:
        names += [sensitivity_plot(out, runs, seeds, chosen, m) for m in metrics]
    return [n for n in names if n]
