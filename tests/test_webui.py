"""The web UI without a browser: views computed from a real finished run, the runs-folder file guard,
upload checks, launching and cancelling a training subprocess, and generation on one loaded base."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fluxlora.rundir import GroupDir

pytest.importorskip("gradio")


def test_webui_views_import_no_torch():
    code = "import sys, webui.views, webui.files, webui.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_views_of_a_finished_group(finished_group):
    from webui import views

    runs, group = finished_group
    table = views.groups_table(runs)
    assert list(table["run"]) == ["tiny"] and table["status"][0] == "done"
    assert table["progress"][0] == "8/8 (100%)"
    assert views.sample_steps(group) == [0, 2, 4]
    assert views.nearest_step([0, 2, 4], 3) == 2 and views.nearest_step([0, 2, 4], -1) == 0
    from webui import grid

    assert grid.columns(group, 2) == [("a zxq emblem on a red background, center", 0),
                                      ("a zxq emblem on a red background, center", 1)]
    html = grid.grid_html(runs, group, 2, "/runs-file")
    assert html.count("<tr>") == 3 and html.count("<img") == 4  # header + 2 arms, 1 prompt x 2 seeds
    assert html.count('src="/runs-file/tiny/lora/samples/step-000002/') == 2 and "seed 1</th>" in html
    assert "lora · rank 4 · lr 1.0e-02" in html and "loram · step 2 · seed 1" in html
    loss = views.loss_curves(group)
    assert set(loss["arm"]) == {"lora", "loram"} and len(loss) == 8
    facts = views.facts_table(group)
    assert list(facts["method"]) == ["lora", "loram"] and list(facts["rank"]) == [4, 4]
    assert all(f != "-" for f in facts["peak MB"])
    assert [(a, f) for a, f, _ in views.adapter_files(group)] == [  # every format's file, from the format table
        ("lora", "diffusers"), ("lora", "comfyui"), ("loram", "diffusers"), ("loram", "comfyui")]
    assert views.open_group(runs, "../tiny") is None and views.open_group(runs, "tiny").root == group.root


def test_an_unchanged_run_table_is_not_redrawn(finished_group):
    import gradio as gr

    from webui import views
    from webui.handlers import Handlers

    h = Handlers(finished_group[0])
    table, pick = h.refresh_groups(None)
    assert list(table["run"]) == ["tiny"] and pick["value"] == "tiny" and pick["choices"] == ["tiny"]
    as_sent = table.astype(str)  # what the page sends back
    again, pick = h.refresh_groups("tiny", as_sent)
    assert again == gr.update() and pick["choices"] == ["tiny"]
    assert not views.same_rows(as_sent.iloc[:0], table)


def _new_step(root, step: int) -> None:
    """What a training run adds at a sample step: a sample folder per arm and a metrics record."""
    import shutil

    for arm in ("lora", "loram"):
        samples = root / arm / "samples"
        shutil.copytree(samples / "step-000004", samples / f"step-{step:06d}")
        with open(root / arm / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "subject_fidelity": 0.5}) + "\n")


def test_the_live_view_sends_nothing_until_the_run_has_something_new(finished_group, tmp_path):
    import shutil

    import gradio as gr

    from webui.handlers import Handlers

    runs = tmp_path / "runs"
    shutil.copytree(finished_group[0], runs)
    h = Handlers(runs)
    seen = h.seen("tiny")
    assert h.live("tiny", 4, seen) == (gr.update(), gr.update(), gr.update(), gr.update(), seen)
    _new_step(runs / "tiny", 6)
    slider, loss, facts, downloads, now = h.live("tiny", 4, seen)
    assert slider["maximum"] == 6 and slider["value"] == 6  # it was at the newest step: it follows
    assert now != seen and h.live("tiny", 6, now)[-1] == now
    _new_step(runs / "tiny", 8)
    slider, *_ = h.live("tiny", 2, now)  # looking at an earlier step: the slider grows and stays there
    assert slider["maximum"] == 8 and "value" not in slider


def test_one_cell_for_the_base_and_every_arm_with_the_difference(finished_group):
    import base64
    import io

    from webui import grid

    runs, group = finished_group
    html = grid.compare_html(runs, group, 4, 1, False, "/runs-file")
    assert html.count("<img") == 3 and "base (step 0)" in html  # the base + 2 arms
    assert 'src="/runs-file/tiny/lora/samples/step-000000/01.png"' in html
    assert 'src="/runs-file/tiny/loram/samples/step-000004/01.png"' in html
    diff = grid.compare_html(runs, group, 4, 1, True, "/runs-file")
    uri = diff.split('src="data:image/png;base64,')[1].split('"')[0]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))), dtype=np.int16)
    arm = np.asarray(Image.open(runs / "tiny/lora/samples/step-000004/01.png").convert("RGB"), dtype=np.int16)
    base = np.asarray(Image.open(runs / "tiny/lora/samples/step-000000/01.png").convert("RGB"), dtype=np.int16)
    assert np.array_equal(shown, np.clip(np.abs(arm - base) * grid.DIFF_GAIN, 0, 255))
    at0 = grid.compare_html(runs, group, 0, 0, True, "/runs-file")  # step 0 equals the base: all black
    first = at0.split('src="data:image/png;base64,')[1].split('"')[0]
    assert not np.asarray(Image.open(io.BytesIO(base64.b64decode(first)))).any()


def test_the_step_slider_clamps_a_value_from_before_a_range_change():
    """Switching to a run with fewer steps shrinks the range while an event in flight still carries the old
    step: clamped to the new range instead of Gradio's out-of-bounds error; drawn with Slider's widget."""
    from webui.app import StepSlider

    slider = StepSlider(0, 100, step=1, value=100)
    assert slider.preprocess(400) == 100 and slider.preprocess(-3) == 0 and slider.preprocess(50) == 50
    assert slider.get_block_name() == "slider"


def test_smoothing_is_a_bias_corrected_moving_average():
    from webui.views import smooth

    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth([0.0, 1.0], factor=0.5)
    assert out == pytest.approx([0.0, 0.5 * 1.0 / 0.75])


def test_file_guard_serves_only_files_inside_the_runs_folder(tmp_path):
    from webui.files import resolve_inside

    runs = tmp_path / "runs"
    (runs / "tiny" / "lora" / "checkpoints").mkdir(parents=True)
    adapter = runs / "tiny" / "lora" / "adapter.safetensors"
    adapter.write_bytes(b"x")
    (runs / "tiny" / ".lock").write_text("1")
    (runs / "tiny" / "config.py").write_text("")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (runs / "tiny" / "link.png").symlink_to(outside)
    loop = runs / "tiny" / "loop.png"
    loop.symlink_to(loop)
    assert resolve_inside(runs, "tiny/lora/adapter.safetensors") == adapter.resolve()
    for bad in ("../secret.png", "tiny/../../secret.png", str(outside), "tiny/link.png", "tiny/loop.png",
                "tiny/lora", "tiny/.lock", "tiny/lora/checkpoints/missing.png", "tiny/config.py", "a\x00b.png", ""):
        assert resolve_inside(runs, bad) is None, bad
    step = runs / "tiny" / "lora" / "checkpoints" / "step-000002"
    step.mkdir()
    for name in ("adapter.safetensors", "trainer.pt"):
        (step / name).write_bytes(b"x")
    (runs / "tiny" / "lora" / "metrics.jsonl").write_text("{}")
    for private in ("tiny/lora/checkpoints/step-000002/adapter.safetensors",
                    "tiny/lora/checkpoints/step-000002/trainer.pt", "tiny/lora/metrics.jsonl"):
        assert resolve_inside(runs, private) is None, private


def test_gradio_file_route_gets_the_same_rule_inside_the_runs_folder(tmp_path):
    from webui.files import refused_by_gradio_route

    runs = tmp_path / "runs"
    (runs / "tiny" / "lora" / "samples" / "step-000000").mkdir(parents=True)
    sample = runs / "tiny" / "lora" / "samples" / "step-000000" / "00.png"
    sample.write_bytes(b"x")
    (runs / "tiny" / ".lock").write_text("1")
    assert not refused_by_gradio_route(runs, f"/gradio_api/file={sample}")
    assert not refused_by_gradio_route(runs, "/gradio_api/file=/tmp/gradio/abc/image.png")  # Gradio's cache
    assert not refused_by_gradio_route(runs, f"/runs-file/{sample}")  # another route: its own rule
    for bad in (f"/gradio_api/file={runs}/tiny/.lock", f"/file={runs}/tiny/lora/checkpoints/step-000002/trainer.pt",
                f"/gradio_api/file={runs}/tiny/lora/samples/step-000000/../../metrics.jsonl",
                f"/gradio_api/file={str(runs).replace('/', '%2F')}%2Ftiny%2F.lock"):
        assert refused_by_gradio_route(runs, bad), bad


def test_the_log_tail_keeps_the_last_redraw_of_each_progress_bar():
    from webui.launch import collapse_progress

    lines = ["validation: 3 held-out image(s)", "lora:  10%|#    | 40/400 [00:02<00:18]",
             "lora:  20%|##   | 80/400 [00:04<00:16]", "lora: 100%|#####| 400/400 [00:20<00:00]",
             "pissa:   5%|     | 20/400 [00:01<00:19]", "pissa:  10%|#    | 40/400 [00:02<00:18]", "done"]
    assert collapse_progress(lines) == [lines[0], lines[3], lines[5], "done"]


def test_download_names_say_run_arm_and_step():
    from webui.files import download_name

    assert download_name(("tiny", "lora", "adapter.safetensors")) == "tiny-lora.safetensors"
    assert download_name(("tiny", "lora", "adapter_comfyui.safetensors")) == "tiny-lora_comfyui.safetensors"
    assert download_name(("tiny", "pissa", "exports", "step-000200", "adapter_comfyui.safetensors")) == \
        "tiny-pissa-step200_comfyui.safetensors"
    assert download_name(("study", "seed0_lr0.001", "lora", "adapter.safetensors")) == \
        "study-seed0_lr0.001-lora.safetensors"


def test_pick_a_step_and_export_it_from_the_page(finished_group, tmp_path):
    import shutil

    from webui.handlers import Handlers

    runs = tmp_path / "runs"
    shutil.copytree(finished_group[0], runs)
    h = Handlers(runs)
    arm, step = h.export_choices("tiny", None)
    assert arm["choices"] == ["lora", "loram"] and arm["value"] == "lora" and step["choices"] == [4]
    arm, step = h.export_choices("tiny", "loram")
    assert arm["value"] == "loram" and step["value"] == 4
    status, html = h.export_step("tiny", "loram", 3)
    assert "export failed" in status and "no checkpoint at step 3 (it has: 4)" in status
    status, html = h.export_step("tiny", "loram", 4)
    assert "exported **loram** at step 4" in status, status
    assert "loram · step 4 — adapter.safetensors (diffusers" in html and "loram · final" in html
    assert (runs / "tiny" / "loram" / "exports" / "step-000004" / "adapter_comfyui.safetensors").is_file()


def test_auth_value_is_checked():
    from webui.files import parse_auth

    assert parse_auth("me:secret:x") == ("me", "secret:x") and parse_auth(None) is None
    for bad in ("me", ":x", "me:"):
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_auth(bad)


def _images(folder, n, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (size, size), (40 * i % 255, 90, 200)).save(p)
        paths.append(p)
    return paths


def test_launch_form_problems_are_all_reported_and_nothing_is_left(tmp_path):
    from webui.launch import LaunchError, LaunchForm, stage

    runs = tmp_path / "runs"
    runs.mkdir()
    imgs = _images(tmp_path / "up", 2)
    fake = tmp_path / "up" / "fake.png"
    fake.write_text("not an image")
    small = _images(tmp_path / "small", 1, size=16)[0]
    form = LaunchForm(name="../evil", images=imgs + [fake, small], trigger="a b", prompt="no placeholder", arms=[])
    with pytest.raises(LaunchError) as e:
        stage(form, runs)
    text = str(e.value)
    for needle in ("run name", "trigger word", "{trigger}", "fake.png: not a readable image", "smaller than 32",
                   "arms"):
        assert needle in text, needle
    assert not any(runs.iterdir())
    many = LaunchForm(name="ok", images=_images(tmp_path / "many", 21), trigger="zxq")
    with pytest.raises(LaunchError, match="upload 3-20"):
        stage(many, runs)


def test_captions_uploaded_with_their_images_go_with_them(tmp_path):
    from fluxlora.data import load_samples
    from webui.launch import LaunchError, LaunchForm, screen_uploads, stage

    runs = tmp_path / "runs"
    runs.mkdir()
    imgs = _images(tmp_path / "up", 3)
    (tmp_path / "up" / "img1.txt").write_text("a zxq emblem on a blue background, top left\n")
    stray = tmp_path / "up" / "notes.txt"
    stray.write_text("no image of this name")
    empty = tmp_path / "up" / "img2.txt"
    empty.write_text("  \n")
    kept, problems = screen_uploads(imgs + [tmp_path / "up" / "img1.txt", empty])
    assert len(kept) == 4 and problems == ["img2.txt: an empty caption (delete it to use the form's caption)"]
    with pytest.raises(LaunchError, match="notes.txt: no image named notes"):
        stage(LaunchForm(name="cap", images=imgs + [stray], trigger="zxq"), runs)
    config = stage(LaunchForm(name="cap", images=kept, trigger="zxq", prompt="a photo of {trigger}"), runs)
    samples = load_samples(str(config.parent / "images"), "a photo of zxq")
    assert [s.caption for s in samples] == ["a photo of zxq", "a zxq emblem on a blue background, top left",
                                            "a photo of zxq"]


def test_launch_then_cancel_keeps_a_resumable_checkpoint(tmp_path, tiny_flux):
    """The subprocess is stopped by SIGTERM like Ctrl-C: exit 143, arm 'interrupted', a checkpoint to resume.
    The job table belongs to the runs folder: another server (or page) sees the job, cancels and resumes it."""
    from webui.jobs import Jobs
    from webui.launch import LaunchForm, stage

    runs = tmp_path / "runs"
    form = LaunchForm(name="sub", images=_images(tmp_path / "up", 3), trigger="zxq", arms=["lora"], rank=2,
                      steps=5000, resolution=64, model_path=str(tiny_flux))
    runs.mkdir()
    config = stage(form, runs)
    jobs = Jobs(runs)
    jobs.start("sub", config)
    arm = GroupDir(runs / "sub").arm("lora")

    def wait_past(step: int) -> None:
        deadline = time.monotonic() + 240
        while (arm.status().get("step") or 0) <= step and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (arm.status().get("step") or 0) > step, jobs.log_tail("sub")

    wait_past(2)
    assert jobs.running("sub") and jobs.rows()[0]["state"] == "running"
    message = jobs.cancel("sub", grace=120)
    assert "stopped (exit 143)" in message and "--resume" in message, message
    assert arm.status()["status"] == "interrupted"
    assert arm.checkpoints(), "no checkpoint written on cancel"
    other = Jobs(runs)  # a restarted server: it knows the job from the table only
    assert [(r["job"], r["state"]) for r in other.rows()] == [("sub", "interrupted")]
    stopped_at = arm.checkpoint_steps()[-1]
    assert "resumed" in other.resume("sub")
    wait_past(stopped_at + 2)
    assert Jobs(runs).running("sub") and "already running" in Jobs(runs).resume("sub")
    message = Jobs(runs).cancel("sub", grace=120)  # not the server that started it: by pid from the table
    assert message.startswith("sub stopped;") and "Resume" in message, message
    assert arm.status()["status"] == "interrupted", (arm.status(), Jobs(runs).log_tail("sub"))
    # The canceller saw the process exit (a zombie); its parent, `other`, reaps it on its next poll. On a busy
    # machine the kernel may still be tearing the process's threads down for a moment: waitpid then says
    # "running" a little longer.
    deadline = time.monotonic() + 30
    while other.running("sub") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not other.running("sub")
    assert arm.checkpoint_steps()[-1] > stopped_at


def test_generate_uses_one_base_and_reproduces_the_trained_samples(finished_group):
    """Each arm's image equals its final training sample; the base equals the step-0 sample; the base
    pipeline is loaded once for all of it."""
    from webui.handlers import Handlers

    runs, group = finished_group
    h = Handlers(runs)
    out = h.generate("tiny", "a zxq emblem on a red background, center", 1, 0, True)
    assert [label for _, label in out] == ["base · seed 1", "lora · seed 1", "loram · seed 1"]
    expected = {"base": group.arm("lora").samples_dir / "step-000000" / "01.png",
                "lora": group.arm("lora").samples_dir / "step-000004" / "01.png",
                "loram": group.arm("loram").samples_dir / "step-000004" / "01.png"}
    for img, label in out:
        want = np.asarray(Image.open(expected[label.split(" · ")[0]])).astype(int)
        assert np.abs(np.asarray(img).astype(int) - want).max() <= 1, label
    h.generate("tiny", "a zxq emblem on a blue background, center", 2, 0, False)
    assert h.bench_loads == 1


def test_auth_guards_pages_api_and_files(finished_group):
    from fastapi.testclient import TestClient

    from webui.app import create_app

    runs, _ = finished_group
    app, _ = create_app(runs, auth="me:secret")
    client = TestClient(app)
    for path in ("/", "/runs-file/tiny/lora/adapter.safetensors", "/gradio_api/info"):
        refused = client.get(path)
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"], path
        assert client.get(path, auth=("me", "wrong")).status_code == 401
    assert client.get("/runs-file/tiny/lora/adapter.safetensors", auth=("me", "secret")).status_code == 200
    assert client.get("/", auth=("me", "secret")).status_code == 200
