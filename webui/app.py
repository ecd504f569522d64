"""`fluxlora webui`: the Gradio page that compares a run's arms side by side, step by step.

Layout: a run browser on top (live status), then tabs: Steps (the grid, rows = arms, columns = prompt x
seed, one slider for all rows, and one cell large for the base and every arm), Curves, Facts, Generate (every arm's adapter on one loaded base),
Launch (upload a subject, start `fluxlora train`), Download, Sweeps (a sweep's report.md and plots). Files are served only from the runs folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from fluxlora.config import KNOWN_INITS
from webui import views
from webui.files import BasicAuth, RunsFileGuard, add_file_route, parse_auth
from webui.handlers import FILE_ROUTE, Handlers
from fluxlora.metric_info import METRICS
from webui.launch import MAX_IMAGE_BYTES, MAX_IMAGES, MAX_UPLOAD_BYTES, MIN_IMAGES, UPLOADS

CSS = """
#generate-out { max-width: 880px; }
#generate-out img { image-rendering: pixelated; }
"""
REFRESH_SECONDS = 2.0


class StepSlider(gr.Slider):
    """The step slider: a value outside its range is clamped, not refused. Switching from a run with steps
    up to 400 to one with 100 updates the range, while an event already on its way from the page (the live
    poll, Play) still carries 400; Gradio's slider would refuse it with an error. Same page widget."""

    is_template = True  # Gradio draws a template component with its parent's (Slider's) widget

    def preprocess(self, payload: float) -> float:
        if payload is not None:
            payload = min(max(payload, self.minimum), self.maximum)
        return super().preprocess(payload)


def _browser(h: Handlers):
    with gr.Row():
        groups = views.groups_table(h.runs)
        table = gr.Dataframe(groups, label="Runs (click a row)", interactive=False,
                             elem_id="groups-table", scale=3, max_height=220)
        with gr.Column(scale=1):
            names = list(groups["run"])
            pick = gr.Dropdown(names, value=names[0] if names else None, label="Run", elem_id="group-pick")
            refresh = gr.Button("Refresh", elem_id="refresh-btn", size="sm")
    return table, pick, refresh


def _steps_tab():
    with gr.Row():
        slider = StepSlider(0, 1, step=1, value=0, label="Step (all rows move together)", elem_id="step-slider",
                            scale=5)
        play = gr.Button("▶ Play", elem_id="play-btn", scale=1)
    caption = gr.Markdown(elem_id="grid-caption")
    table = gr.HTML(elem_id="step-grid")
    with gr.Row():
        cell = gr.Dropdown([], label="Compare one cell: the base and every arm, large", elem_id="compare-cell",
                           scale=4)
        diff = gr.Checkbox(False, label="difference to the base", elem_id="compare-diff", scale=1)
    compare = gr.HTML(elem_id="compare-out")
    return slider, play, caption, table, cell, diff, compare


def _curves_tab(h: Handlers, pick, seen):
    loss = gr.LinePlot(views.loss_curves_empty(), x="step", y="loss", color="arm",
                       title="training loss (smoothed; lower is better)",
                       tooltip=["arm", "step", "loss", "raw"], elem_id="loss-plot", height=280)

    @gr.render(inputs=[pick, seen])  # redrawn when the run changes or has new metric points
    def metric_plots(name, _seen):
        group = views.open_group(h.runs, name)
        if group is None:
            return
        for metric in views.metric_names(group):
            known = METRICS.get(metric)
            title = f"{metric} ({known.arrow}): {known.label}" if known else metric
            gr.LinePlot(views.metric_curves(group, metric), x="step", y=metric, color="arm", title=title,
                        tooltip=["arm", "step", metric], height=240, key=f"metric-{metric}")

    return loss


def _generate_tab():
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt", scale=4,
                            placeholder="a zxq emblem on a green background, bottom left")
        seed = gr.Number(0, label="Seed", precision=0, elem_id="gen-seed", scale=1)
        steps = gr.Number(0, label="Steps (0 = the run's)", precision=0, minimum=0, maximum=200, scale=1)
        with_base = gr.Checkbox(True, label="include the base model", scale=1)
    go = gr.Button("Generate with every arm", variant="primary", elem_id="gen-btn")
    out = gr.Gallery(label="base + one image per arm, same seed", columns=4, elem_id="generate-out",
                     object_fit="contain", height="auto")
    return prompt, seed, steps, with_base, go, out


def _resolution_for(model: str, current) -> object:
    """The toy world is 64 px; any other model starts at 512 (a value the user chose is kept)."""
    if model.strip() == "toy":
        return 64
    return 512 if current in (None, 64, "64") else gr.update()


def _launch_tab():
    gr.Markdown(f"Upload {MIN_IMAGES}-{MAX_IMAGES} images of your subject (PNG/JPEG/WebP, at most "
                f"{MAX_IMAGE_BYTES // 2**20} MB each). Training runs as a `fluxlora train` subprocess; "
                "cancelling saves a checkpoint (continue later with `--resume`).")
    files = gr.File(file_count="multiple", file_types=[".png", ".jpg", ".jpeg", ".webp", ".txt"],
                    label="Subject images (+ optional captions: a .txt with the image's name)", elem_id="launch-files")
    with gr.Row():
        name = gr.Textbox(label="Run name", elem_id="launch-name")
        trigger = gr.Textbox("zxq", label="Trigger word", elem_id="launch-trigger")
        prompt = gr.Textbox("a photo of {trigger}", label="Caption ({trigger} is replaced)", elem_id="launch-prompt")
        model = gr.Textbox("toy", label="Base model (path, hub id or 'toy')", elem_id="launch-model")
    with gr.Row():
        arms = gr.CheckboxGroup(list(KNOWN_INITS), value=["lora", "pissa", "loram"], label="Arms",
                                elem_id="launch-arms")
        rank = gr.Slider(1, 128, value=8, step=1, label="Rank", elem_id="launch-rank")
        steps = gr.Number(400, label="Steps", precision=0, minimum=1, maximum=100000, elem_id="launch-steps")
        res = gr.Dropdown([64, 256, 512, 768, 1024], value=64, label="Resolution (64 for the toy model)",
                          elem_id="launch-res")
    start = gr.Button("Start training", variant="primary", elem_id="launch-btn")
    status = gr.Markdown(elem_id="launch-status")
    with gr.Row():
        jobs = gr.Dataframe(views.jobs_frame([]), label="Jobs launched from the web UI (any page)",
                            interactive=False, elem_id="jobs-table", scale=3, max_height=200)
        with gr.Column(scale=1):
            job = gr.Dropdown([], label="Job", elem_id="job-pick")
            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", size="sm")
            resume = gr.Button("Resume", elem_id="resume-btn", size="sm")
    log = gr.Textbox(label="trainer output (tail)", lines=8, interactive=False, elem_id="launch-log")
    model.change(_resolution_for, [model, res], res)
    return [files, name, trigger, prompt, arms, rank, steps, res, model], start, status, (jobs, job, cancel,
                                                                                          resume), log


def _export_controls():
    gr.Markdown("Export an earlier step: the adapter of that step's checkpoint, in every format of the run "
                "(steps with a checkpoint: `train.checkpoint_every`, `train.keep_checkpoints`).")
    with gr.Row():
        arm = gr.Dropdown([], label="Arm", elem_id="export-arm")
        step = gr.Dropdown([], label="Step", elem_id="export-step")
        go = gr.Button("Export this step", elem_id="export-btn")
    status = gr.Markdown(elem_id="export-status")
    return arm, step, go, status


def _sweeps_tab():
    with gr.Row():
        pick = gr.Dropdown([], label="Sweep (runs/<sweep>/sweep.json)", elem_id="sweep-pick", scale=4)
        reload = gr.Button("Reload report", elem_id="sweep-reload", size="sm", scale=1)
    report = gr.Markdown("open this tab to list the sweeps", elem_id="sweep-report")
    return pick, reload, report


def build(runs: Path) -> tuple[gr.Blocks, Handlers]:
    h = Handlers(runs)
    with gr.Blocks(title="fluxlora — side by side") as demo:
        gr.Markdown("## fluxlora · LoRA initializations side by side")
        table, pick, refresh = _browser(h)
        seen = gr.State("")  # the chosen run's views.signature when last drawn (the live view compares it)
        with gr.Tabs():
            with gr.Tab("Steps", id="steps"):
                slider, play, caption, grid, cell, diff, compare = _steps_tab()
            with gr.Tab("Curves", id="curves"):
                loss = _curves_tab(h, pick, seen)
            with gr.Tab("Facts", id="facts"):
                facts = gr.Dataframe(views.facts_empty(), interactive=False, elem_id="facts-table")
            with gr.Tab("Generate", id="generate"):
                g_prompt, g_seed, g_steps, g_base, g_go, g_out = _generate_tab()
            with gr.Tab("Launch", id="launch"):
                form, start, l_status, (jobs, job, cancel, resume), l_log = _launch_tab()
            with gr.Tab("Download", id="download") as download_tab:
                downloads = gr.HTML(elem_id="downloads")
                x_arm, x_step, x_go, x_status = _export_controls()
            with gr.Tab("Sweeps", id="sweeps") as sweeps_tab:
                s_pick, s_reload, s_report = _sweeps_tab()
        playing = gr.State(False)
        live, player = gr.Timer(REFRESH_SECONDS), gr.Timer(1.0, active=False)

        group_outputs = [slider, grid, caption, cell, loss, facts, downloads]
        pick.change(h.select_group, pick, group_outputs).then(h.seen, pick, seen)
        demo.load(h.refresh_groups, pick, [table, pick]).then(h.select_group, pick, group_outputs).then(
            h.seen, pick, seen)
        table.select(h.pick_row, [pick, table], [table, pick])
        refresh.click(h.refresh_groups, pick, [table, pick]).then(h.select_group, pick, group_outputs)
        # one event for every way the step changes: dragging, typing, the play timer, a new group
        slider.change(h.move_step, [pick, slider], [grid, caption], trigger_mode="always_last")
        for event in (slider.change, cell.change, diff.change):
            event(h.compare, [pick, slider, cell, diff], compare, trigger_mode="always_last")
        play.click(h.play, playing, [playing, player, play])
        player.tick(h.tick_play, [pick, slider], slider)
        live.tick(h.refresh_groups, [pick, table], [table, pick], show_progress="hidden")
        live.tick(h.live, [pick, slider, seen], [slider, loss, facts, downloads, seen], show_progress="hidden")
        live.tick(h.launch_progress, job, [l_status, l_log, jobs, job], show_progress="hidden")
        g_go.click(h.generate, [pick, g_prompt, g_seed, g_steps, g_base], g_out, concurrency_limit=1)
        form[0].upload(h.screen_uploads, form[0], [form[0], l_status])
        start.click(h.launch, form, [job, l_status])
        cancel.click(h.cancel, job, l_status)
        resume.click(h.resume, job, l_status)
        for event in (download_tab.select, x_arm.input):
            event(h.export_choices, [pick, x_arm], [x_arm, x_step])
        x_go.click(h.export_step, [pick, x_arm, x_step], [x_status, downloads], concurrency_limit=1)
        for event in (sweeps_tab.select, s_pick.input, s_reload.click):
            event(h.sweeps, s_pick, [s_pick, s_report])
    return demo, h


def create_app(runs: Path, auth: str | None = None):
    """The FastAPI app: runs-folder file route, optional basic auth, Gradio mounted at '/'."""
    from fastapi import FastAPI

    runs = Path(runs).resolve()
    demo, handlers = build(runs)
    app = FastAPI()
    add_file_route(app, runs, FILE_ROUTE)
    app.add_middleware(RunsFileGuard, runs=runs)
    credentials = parse_auth(auth)
    if credentials:
        app.add_middleware(BasicAuth, user=credentials[0], password=credentials[1])
    app = gr.mount_gradio_app(app, demo, path="", allowed_paths=[str(runs)],
                              blocked_paths=[str(runs / UPLOADS)], max_file_size=MAX_UPLOAD_BYTES,
                              footer_links=[], css=CSS)
    return app, handlers


def serve(runs: Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          threads: int | None = None) -> int:
    import uvicorn

    try:
        app, handlers = create_app(runs, auth)
        handlers.threads = threads
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: other machines can reach this UI"
              + ("" if auth else " without a password (add --auth user:pass)"), file=sys.stderr)
    print(f"fluxlora web UI on http://{host}:{port}  (runs folder: {Path(runs).resolve()})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        handlers.jobs.stop_all()
    return 0
