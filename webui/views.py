"""What the web UI shows, computed from run folders through fluxlora.rundir only (no torch, no gradio).

Every function takes paths and returns plain data (lists, dicts, DataFrames), so the views are tested
without a browser and the Gradio layer stays a thin wiring of components to these functions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from fluxlora.metric_info import METRICS
from fluxlora.rundir import SWEEP_STATE, ArmDir, GroupDir, group_label, list_groups, list_sweeps, read_json

LOSS_SMOOTHING = 0.9  # exponential moving average factor of the displayed loss curve
FACT_COLUMNS = ["arm", "method", "rank", "scale", "lr", "clipped", "trainable params", "init s", "steps/s",
                "peak MB", "status"]
METRIC_SKIP = {"step", "time", "loss", "lr", "grad_norm", "clipped", "step_time", "sigma_sum", "noise_sum"}


def group_progress(group: GroupDir) -> tuple[str, int, int]:
    """(status, steps done, steps total) summed over the group's arms, read from their status.json."""
    done = total = 0
    states = []
    for arm in group.arms():
        st = arm.status()
        states.append(st.get("status", "queued"))
        done += int(st.get("step", 0) or 0)
        total += int(st.get("total", 0) or 0)
    status = group.info().get("status") or ("running" if "running" in states else "queued")
    if "running" in states:
        status = "running"
    return status, done, total


def groups_table(runs: Path) -> pd.DataFrame:
    """One row per run group: name, arms, status, progress, created."""
    rows = []
    newest_first = sorted(list_groups(runs), key=lambda g: g.info().get("created", 0), reverse=True)
    for g in newest_first:
        info = g.info()
        status, done, total = group_progress(g)
        pct = f"{100 * done / total:.0f}%" if total else "-"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("created", 0)))
        rows.append({"run": group_label(runs, g), "arms": ", ".join(info.get("arms", [])), "status": status,
                     "progress": f"{done}/{total} ({pct})", "created": created})
    return pd.DataFrame(rows, columns=["run", "arms", "status", "progress", "created"])


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two run tables show the same text (a table sent back by the page has its own dtypes)."""
    return list(a.columns) == list(b.columns) and a.astype(str).values.tolist() == b.astype(str).values.tolist()


def open_group(runs: Path, name: str | None) -> GroupDir | None:
    """The group called ``name`` inside ``runs``; None for anything that is not one of its groups
    (so a crafted name like ``../x`` can never select a folder outside the runs folder)."""
    parts = (name or "").split("/")
    if not name or len(parts) > 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
        return None
    root = Path(runs).joinpath(*parts)
    if not (root / "group.json").is_file() or (len(parts) == 2 and not (root.parent / SWEEP_STATE).is_file()):
        return None
    return GroupDir(root)


def sample_steps(group: GroupDir) -> list[int]:
    """Every step for which at least one arm has a complete sample folder, ascending."""
    return sorted({s for arm in group.arms() for s in arm.sample_steps()})


def signature(group: GroupDir | None) -> str:
    """What changes while a run trains, cheaply (sample folders and metrics file sizes): the live view
    reloads only when this changes. JSON: {"steps": [...], "files": [...]}."""
    import json

    if group is None:
        return ""
    files = [(a.name, a.metrics_file.stat().st_size if a.metrics_file.exists() else 0,
              a.status().get("status")) for a in group.arms()]
    return json.dumps({"steps": sample_steps(group), "files": files})


def signature_steps(sig: str | None) -> list[int]:
    import json

    try:
        return list(json.loads(sig)["steps"]) if sig else []
    except (ValueError, KeyError, TypeError):
        return []


def nearest_step(steps: list[int], wanted: float) -> int | None:
    """The latest available step at or before ``wanted`` (the first one if ``wanted`` is earlier)."""
    if not steps:
        return None
    earlier = [s for s in steps if s <= wanted]
    return earlier[-1] if earlier else steps[0]


def smooth(values: list[float], factor: float = LOSS_SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard displays it)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**i))
    return out


def loss_curves(group: GroupDir) -> pd.DataFrame:
    """Long table (arm, step, loss smoothed, raw) for one line per arm."""
    frames = []
    for arm in group.arms():
        recs = [r for r in arm.metrics() if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if recs:
            raw = [r["loss"] for r in recs]
            frames.append(pd.DataFrame({"arm": arm.name, "step": [r["step"] for r in recs],
                                        "loss": smooth(raw), "raw": raw}))
    return pd.concat(frames, ignore_index=True) if frames else loss_curves_empty()


def loss_curves_empty() -> pd.DataFrame:
    return pd.DataFrame({"arm": [], "step": [], "loss": [], "raw": []})


def metric_names(group: GroupDir) -> list[str]:
    """Every numeric metric any arm logged at its evaluation steps (fidelity, drift, ...)."""
    names: dict[str, None] = {}
    for arm in group.arms():
        for r in arm.metrics():
            for k, v in r.items():
                reference = k in METRICS and METRICS[k].higher_is_better is None  # the base's value: a flat line
                if k not in METRIC_SKIP and not reference and isinstance(v, (int, float)) and not isinstance(v, bool):
                    names.setdefault(k)
    return list(names)


def metric_curves(group: GroupDir, name: str) -> pd.DataFrame:
    rows = [{"arm": arm.name, "step": r["step"], name: r[name]} for arm in group.arms()
            for r in arm.metrics() if isinstance(r.get(name), (int, float))]
    return pd.DataFrame(rows, columns=["arm", "step", name])


def _steps_per_second(arm: ArmDir) -> float | None:
    times = [r["step_time"] for r in arm.metrics() if isinstance(r.get("step_time"), (int, float))]
    return len(times) / sum(times) if times and sum(times) > 0 else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def facts_table(group: GroupDir) -> pd.DataFrame:
    """Per arm: init method, rank, scale, lr, share of clipped steps, trainable params, init time, steps/s,
    peak memory, status."""
    rows = []
    for arm in group.arms():
        init = read_json(arm.init_file, {}) or {}
        st = arm.status()
        summary = st.get("summary") or {}
        rows.append({
            "arm": arm.name, "method": init.get("method", st.get("method", arm.name)),
            "rank": init.get("rank", "-"), "scale": _fmt(init.get("scale"), ".4g"),
            "lr": _fmt(summary.get("lr"), ".1e"), "clipped": _fmt(summary.get("clip_fraction"), ".0%"),
            "trainable params": _fmt(init.get("trainable_params"), ","),
            "init s": _fmt(init.get("init_seconds"), ".3f"), "steps/s": _fmt(_steps_per_second(arm), ".2f"),
            "peak MB": _fmt(summary.get("peak_memory_mb"), ".0f"),
            "status": st.get("status", "queued") + (f": {st['error']}" if st.get("error") else ""),
        })
    return pd.DataFrame(rows, columns=FACT_COLUMNS)


def facts_empty() -> pd.DataFrame:
    return pd.DataFrame([], columns=FACT_COLUMNS)


def adapter_files(group: GroupDir) -> list[tuple[str, str, Path]]:
    """(arm, format, exported adapter file) of every arm's final files, in the format table's order."""
    return [(arm.name, fmt, path) for arm in group.arms() for fmt, path in arm.export_files()]


def step_files(group: GroupDir) -> list[tuple[str, int, str, Path]]:
    """(arm, step, format, file) of every file exported from an earlier checkpoint (`export --step`)."""
    return [(arm.name, step, fmt, path) for arm in group.arms() for step, fmt, path in arm.step_exports()]


def checkpoint_steps(group: GroupDir | None, arm: str | None) -> list[int]:
    names = [a.name for a in group.arms()] if group else []
    return group.arm(arm).checkpoint_steps() if group and arm in names else []


def sweep_names(runs: Path) -> list[str]:
    return [p.name for p in list_sweeps(runs)]


def _cells_where(name: str, state: dict) -> str:
    parts = [f"{p['name']} ({p['folder']})" for p in state.get("parts", [])]
    if parts:  # a study (fluxlora/study.py): its cells live in its parts' sweep folders
        return f". A study of {', '.join(parts)}: its cells are in those sweep folders."
    return f". Its cells are in the run list as `{name}/<cell>`."


def sweep_report(runs: Path, name: str | None, file_route: str) -> str:
    """The sweep's progress line and report.md, its plot links pointing at the runs-folder file route."""
    folder = next((p for p in list_sweeps(runs) if p.name == name), None)
    if folder is None:
        return "no sweep selected (start one with `fluxlora sweep sweep.yaml`)"
    state = read_json(folder / SWEEP_STATE, {}) or {}
    eta = state.get("eta_s")
    head = (f"**{name}**: {state.get('done', 0)} / {state.get('total', '?')} cells done, status "
            f"{state.get('status', '?')}" + (f", about {eta / 60:.0f} min left" if eta and state.get("status") ==
                                            "running" else "") + _cells_where(name, state))
    report = folder / "report.md"
    if not report.is_file():
        return head + "\n\nno report yet (it is written after the first cell finishes)"
    text = report.read_text(encoding="utf-8")
    return head + "\n\n" + text.replace("](plots/", f"]({file_route}/{quote(name)}/plots/")


def jobs_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["job", "state", "started"])
