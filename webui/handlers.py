"""The web UI's callbacks: each turns component values into component updates using webui.views,
webui.launch and (for generation only, imported lazily) fluxlora.bench."""

from __future__ import annotations

import html
import math
import threading
from functools import reduce
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from webui import grid, views
from webui.jobs import Jobs
from webui.launch import LaunchError, LaunchForm, screen_uploads, stage

FILE_ROUTE = "/runs-file"


class Handlers:
    """State shared by all browser sessions of one server: the runs folder, the training subprocesses it
    started, and the one loaded base model used for generation (with its arms' adapters)."""

    def __init__(self, runs: Path):
        self.runs = Path(runs)
        self.jobs = Jobs(self.runs)
        self._bench = None
        self._bench_lock = threading.Lock()
        self.bench_loads = 0  # how many times a base model was loaded (a group switch loads a new one)
        self.threads: int | None = None  # webui --threads: the generation's torch threads (fluxlora/threads.py)

    # --- run browser ---------------------------------------------------------------------------
    def refresh_groups(self, current: str | None, shown=None):
        """The run table and the selector's choices from one reading of the runs folder (a selector whose
        choices lag behind the table would reject a name the table shows, and Gradio then refuses every later
        event of the page). ``shown``: the table the page shows; when nothing changed it is not redrawn (a
        redraw under the pointer would swallow a click)."""
        self.jobs.any_running()  # reaps launched trainings that finished (no zombie until the server exits)
        table = views.groups_table(self.runs)  # reads every group's status files: once per refresh
        names = list(table["run"])
        value = current if current in names else (names[0] if names else None)
        same = shown is not None and views.same_rows(shown, table)
        return (gr.update() if same else table), gr.update(choices=names, value=value)

    def pick_row(self, current: str | None, shown, evt: gr.SelectData):
        """A click in the run table selects the run named in the clicked row (what the user saw, however old
        the table is), with the table (only if it changed) and the choices refreshed together."""
        row = evt.row_value if isinstance(evt.row_value, (list, tuple)) else None
        return self.refresh_groups(str(row[0]) if row else current, shown)

    # --- step grid -----------------------------------------------------------------------------
    def select_group(self, name: str | None):
        """Everything that depends on the chosen group, with the slider at the latest step."""
        group = views.open_group(self.runs, name)
        steps = views.sample_steps(group) if group else []
        if not steps:
            slider = gr.update(minimum=0, maximum=1, step=1, value=0, interactive=False)
            return slider, "", "no samples yet", gr.update(choices=[], value=None), *self.panels(group)
        stride = reduce(math.gcd, [b - a for a, b in zip(steps, steps[1:])], 0) or 1
        slider = gr.update(minimum=steps[0], maximum=steps[-1], step=stride, value=steps[-1], interactive=True)
        table, label = self._grid(group, steps, steps[-1])
        cells = grid.column_labels(group, steps[-1])
        return slider, table, label, gr.update(choices=cells, value=cells[0] if cells else None), *self.panels(group)

    def _grid(self, group, steps: list[int], wanted: float):
        step = views.nearest_step(steps, wanted)
        return (grid.grid_html(self.runs, group, step, FILE_ROUTE),
                f"**step {step}** of {steps[-1]} · rows: arms · columns: prompt x seed (hover for the full text)")

    def move_step(self, name: str | None, wanted: float):
        group = views.open_group(self.runs, name)
        steps = views.sample_steps(group) if group else []
        if not steps:
            return "", "no samples yet"
        return self._grid(group, steps, wanted)

    def compare(self, name: str | None, wanted: float, cell: str | None, diff: bool) -> str:
        """One cell (prompt x seed) for the base and every arm at the slider's step, large."""
        group = views.open_group(self.runs, name)
        steps = views.sample_steps(group) if group else []
        if not steps or not cell:
            return ""
        step = views.nearest_step(steps, wanted)
        labels = grid.column_labels(group, step)
        if cell not in labels:
            return ""
        return grid.compare_html(self.runs, group, step, labels.index(cell), diff, FILE_ROUTE)

    def live(self, name: str | None, current: float, seen: str | None):
        """The live view (polled): when the chosen run has new samples or metric points, the slider grows
        (and follows to the newest step if it was at the newest before; moving it redraws the grid) and the
        curves, facts and downloads are redrawn. Nothing new: nothing is sent, no image is reloaded."""
        group = views.open_group(self.runs, name)
        sig = views.signature(group)
        if sig == seen or group is None:
            return gr.update(), gr.update(), gr.update(), gr.update(), seen
        steps, before = views.signature_steps(sig), views.signature_steps(seen)
        slider = gr.update()
        if steps:
            follow = not before or current >= before[-1]
            stride = reduce(math.gcd, [b - a for a, b in zip(steps, steps[1:])], 0) or 1
            slider = gr.update(minimum=steps[0], maximum=steps[-1], step=stride, interactive=True,
                               **({"value": steps[-1]} if follow else {}))
        return slider, *self.panels(group), sig

    def seen(self, name: str | None) -> str:
        return views.signature(views.open_group(self.runs, name))

    def play(self, playing: bool):
        playing = not playing
        return playing, gr.Timer(active=playing), gr.update(value="⏸ Pause" if playing else "▶ Play")

    def tick_play(self, name: str | None, current: float):
        """Advance the slider to the next available step, wrapping to the first after the last."""
        group = views.open_group(self.runs, name)
        steps = views.sample_steps(group) if group else []
        if not steps:
            return gr.update()
        later = [s for s in steps if s > current]
        return later[0] if later else steps[0]

    # --- sweeps -------------------------------------------------------------------------------------
    def sweeps(self, current: str | None):
        """The sweep list (kept in step with the runs folder) and the chosen sweep's report."""
        names = views.sweep_names(self.runs)
        value = current if current in names else (names[0] if names else None)
        return gr.update(choices=names, value=value), views.sweep_report(self.runs, value, FILE_ROUTE)

    # --- curves, facts, downloads ----------------------------------------------------------------
    def panels(self, group):
        """Curves, facts and downloads of the chosen group (None: nothing chosen)."""
        if group is None:
            empty = views.loss_curves_empty()
            return empty, views.facts_empty(), "no run selected"
        return views.loss_curves(group), views.facts_table(group), self.downloads_html(group)

    def downloads_html(self, group) -> str:
        files = [(arm, fmt, path, "final") for arm, fmt, path in views.adapter_files(group)]
        files += [(arm, fmt, path, f"step {step}") for arm, step, fmt, path in views.step_files(group)]
        if not files:
            return "no exported adapters yet (they are written when an arm finishes)"
        links = []
        for arm, fmt, path, when in files:
            rel = path.resolve().relative_to(self.runs.resolve()).as_posix()
            size = path.stat().st_size / 2**20
            links.append(f'<li><a class="adapter-download" href="{FILE_ROUTE}/{quote(rel)}" download>'
                         f"{html.escape(arm)} · {when} — {html.escape(path.name)} ({fmt}, {size:.1f} MB)</a></li>")
        return "<ul>" + "".join(links) + "</ul>"

    def export_choices(self, name: str | None, arm: str | None):
        """The arms of the chosen run and the steps of ``arm`` that have a checkpoint to export from."""
        group = views.open_group(self.runs, name)
        arms = [a.name for a in group.arms()] if group else []
        arm = arm if arm in arms else (arms[0] if arms else None)
        steps = views.checkpoint_steps(group, arm)
        return gr.update(choices=arms, value=arm), gr.update(choices=steps, value=steps[-1] if steps else None)

    def export_step(self, name: str | None, arm: str | None, step):
        """`fluxlora export RUN --arm A --step N` (both formats of the run's config) as a subprocess."""
        import subprocess
        import sys

        from fluxlora.threads import for_generation

        group = views.open_group(self.runs, name)
        if group is None or not arm or step in (None, ""):
            return "pick a run, an arm and a step with a checkpoint", gr.update()
        cmd = [sys.executable, "-m", "fluxlora.cli", "export", str(group.root), "--arm", arm, "--step", str(int(step)),
               "--threads", str(for_generation(self.jobs.any_running(), self.threads))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            return f"**export failed:** {(done.stderr.strip().splitlines() or ['?'])[-1]}", gr.update()
        return f"exported **{arm}** at step {int(step)}", self.downloads_html(group)

    # --- generate ----------------------------------------------------------------------------------
    def bench(self, name: str):
        """The loaded base model for group ``name`` (loaded on first use, reused after)."""
        from fluxlora.bench import AdapterBench

        group = views.open_group(self.runs, name)
        if group is None:
            raise gr.Error(f"no run called {name!r} in {self.runs}")
        if self._bench is None or self._bench.group.root != group.root:
            self._bench = None  # free the previous base before loading the next one
            self._bench = AdapterBench(group.root)
            self.bench_loads += 1
        return self._bench

    def generate(self, name: str | None, prompt: str, seed: float, steps: float, with_base: bool):
        if not name:
            raise gr.Error("pick a run first")
        if not prompt.strip():
            raise gr.Error("write a prompt")
        from fluxlora.threads import for_generation, use

        with self._bench_lock:
            use(for_generation(self.jobs.any_running(), self.threads))  # beside a training: 1 thread
            bench = self.bench(name)
            if not bench.arms_with_adapters():
                raise gr.Error(f"run {name} has no exported adapters yet")
            pairs = bench.side_by_side(prompt, int(seed), int(steps) or None, with_base)
        return [(img, f"{label} · seed {int(seed)}") for label, img in pairs]

    # --- launch --------------------------------------------------------------------------------
    def screen_uploads(self, files):
        """Keep the usable images of an upload; a file over the limits (size, type, pixels) is refused alone."""
        paths = [Path(f if isinstance(f, str) else f.name) for f in (files or [])]
        kept, problems = screen_uploads(paths)
        if not problems:
            return gr.update(), gr.update()
        return [str(p) for p in kept], "**left out of the upload:**\n\n" + "\n".join(f"- {p}" for p in problems)

    def launch(self, files, name, trigger, prompt, arms, rank, steps, resolution, model_path):
        paths = [Path(f if isinstance(f, str) else f.name) for f in (files or [])]
        form = LaunchForm(name=(name or "").strip(), images=paths, trigger=(trigger or "").strip(),
                          prompt=prompt or "", arms=list(arms or []), rank=int(rank), steps=int(steps),
                          resolution=int(resolution), model_path=(model_path or "toy").strip())
        try:
            config = stage(form, self.runs)
        except LaunchError as e:
            return gr.update(), "**not started:**\n\n" + "\n".join(f"- {p}" for p in str(e).splitlines())
        self.jobs.start(form.name, config)
        names = [r["job"] for r in self.jobs.rows()]  # the selector learns the new job with its value
        return gr.update(choices=names, value=form.name), \
            f"started **{form.name}** ({', '.join(form.arms)}); config: `{config}`"

    def launch_progress(self, name: str | None):
        """The chosen job's state and log tail, and the job table with the selector's choices (one reading)."""
        rows = self.jobs.rows()
        names = [r["job"] for r in rows]
        pick = gr.update(choices=names, value=name if name in names else (names[0] if names else None))
        table = views.jobs_frame(rows)
        if not name or name not in names:
            return gr.update(), "", table, pick
        group = views.open_group(self.runs, name)
        state = self.jobs.state(name)
        if group is not None:
            status, done, total = views.group_progress(group)
            state = f"{state} · {done}/{total} steps"
        return f"**{name}**: {state}", self.jobs.log_tail(name), table, pick

    def cancel(self, name: str | None):
        if not name:
            return "no job chosen (the table lists every job launched from the web UI)"
        return self.jobs.cancel(name)

    def resume(self, name: str | None):
        if not name:
            return "no job chosen (the table lists every job launched from the web UI)"
        return self.jobs.resume(name)
