"""The real web UI in headless Chromium (Playwright driving Debian's chromium; no browser download).

Screenshots are written to test-artifacts/webui/ (override with FLUXLORA_ARTIFACTS)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the [dev] extras")

ARTIFACTS = Path(os.environ.get("FLUXLORA_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")) / "webui"


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and allowed (root, apt present)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root + apt-get): "
                    "apt-get install -y chromium")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(cmd)}): {done.stderr[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(finished_group, tmp_path_factory):
    """The app (file route + Gradio) served by uvicorn in a thread over a copy of the finished group."""
    import uvicorn

    from webui.app import create_app

    runs = tmp_path_factory.mktemp("ui") / "runs"
    shutil.copytree(finished_group[0], runs)
    app, handlers = create_app(runs)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.started, "web UI did not start"
    yield f"http://127.0.0.1:{port}", runs, handlers
    handlers.jobs.stop_all()
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    exe = _chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 1400})
        pg.set_default_timeout(60_000)
        pg.goto(server[0] + "/")
        pg.wait_for_selector("#step-grid img")
        yield pg
        browser.close()


def _grid_sources(pg) -> list[str]:
    return pg.locator("#step-grid img").evaluate_all("els => els.map(e => e.getAttribute('src'))")


def test_step_slider_moves_every_row(page):
    pg = page
    assert "step 4" in pg.locator("#grid-caption").inner_text()
    before = _grid_sources(pg)
    assert len(before) == 4  # 2 arms x (1 prompt x 2 seeds)
    head = pg.locator("#step-grid thead").inner_text()
    assert "seed 0" in head and "seed 1" in head and "a zxq emblem on a red background" in head
    rows = pg.locator("#step-grid tbody th").all_inner_texts()
    assert rows[0].startswith("lora") and "rank 4" in rows[0] and rows[1].startswith("loram")
    width = pg.locator("#step-grid table").bounding_box()["width"]
    assert width > 1000  # the grid takes the window's width (1280 px), images scale with it
    pg.screenshot(path=str(ARTIFACTS / "steps-4.png"), full_page=True)
    box = pg.locator("#step-slider input[type=number]")
    box.fill("2")
    box.press("Enter")
    pg.wait_for_function("() => document.querySelector('#grid-caption').innerText.includes('step 2')")
    pg.wait_for_function("(old) => { const now = [...document.querySelectorAll('#step-grid img')]"
                         ".map(e => e.getAttribute('src')); return now.length === 4 && now.every((s, i) => s !== old[i]); }",
                         arg=before)
    assert all("step-000002" in src for src in _grid_sources(pg))
    pg.screenshot(path=str(ARTIFACTS / "steps-2.png"), full_page=True)
    pg.locator("#play-btn").click()  # plays 2 -> 4 -> 0 (wraps), one step per second
    pg.wait_for_function("() => document.querySelector('#grid-caption').innerText.includes('step 0')")
    pg.locator("#play-btn").click()
    pg.wait_for_function("() => document.querySelector('#play-btn').innerText.includes('Play')")


def test_compare_one_cell_with_the_base_and_the_difference(page):
    pg = page
    pg.wait_for_function("() => document.querySelectorAll('#compare-out img').length === 3")
    labels = pg.locator("#compare-out").inner_text()
    assert "base (step 0)" in labels and "lora · step" in labels and "loram · step" in labels
    pg.locator("#compare-diff input").check()
    pg.wait_for_function("() => [...document.querySelectorAll('#compare-out img')].filter("
                         "e => e.src.startsWith('data:image/png')).length === 2")
    pg.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    pg.locator("#compare-diff input").uncheck()


def test_facts_and_downloads(page, server):
    pg, (url, runs, _) = page, server
    pg.get_by_role("tab", name="Facts").click()
    facts = pg.locator("#facts-table").inner_text()
    assert "loram" in facts and "lora" in facts
    pg.get_by_role("tab", name="Download").click()
    link = pg.locator("a.adapter-download").first
    href = link.get_attribute("href")
    response = pg.request.get(url + href)
    assert response.ok
    assert response.body() == (runs / "tiny" / "lora" / "adapter.safetensors").read_bytes()


def test_export_an_earlier_step_and_download_it(page, server):
    pg, (url, runs, _) = page, server
    pg.get_by_role("tab", name="Download").click()
    pg.wait_for_function("() => document.querySelector('#export-step input')?.value === '4'")
    pg.locator("#export-btn").click()
    pg.wait_for_function("() => document.querySelector('#export-status').innerText.includes('exported')",
                         timeout=180_000)
    link = pg.locator("a.adapter-download", has_text="lora · step 4 — adapter.safetensors").first
    response = pg.request.get(url + link.get_attribute("href"))
    assert response.ok and 'filename="tiny-lora-step4.safetensors"' in response.headers["content-disposition"]
    assert response.body() == (runs / "tiny" / "lora" / "exports" / "step-000004" / "adapter.safetensors").read_bytes()
    pg.screenshot(path=str(ARTIFACTS / "download.png"), full_page=True)


def test_generate_gives_one_image_per_arm_and_the_base(page):
    pg = page
    pg.get_by_role("tab", name="Generate").click()
    pg.locator("#gen-prompt textarea").fill("a zxq emblem on a blue background, top left")
    pg.locator("#gen-btn").click()
    pg.wait_for_function("() => document.querySelectorAll('#generate-out img').length === 3", timeout=180_000)
    labels = pg.locator("#generate-out").inner_text()
    for name in ("base", "lora", "loram"):
        assert f"{name} · seed 0" in labels
    pg.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)


@pytest.mark.parametrize("path", ["/runs-file/../README.md", "/runs-file/tiny/../../secret.txt",
                                  "/runs-file/%2e%2e/%2e%2e/etc/passwd", "/runs-file//etc/passwd",
                                  "/gradio_api/file=/etc/passwd", "/gradio_api/file=../../etc/passwd"])
def test_paths_outside_the_runs_folder_are_refused(page, server, path):
    (server[1].parent / "secret.txt").write_text("secret")
    response = page.request.get(server[0] + path, max_redirects=0)
    assert response.status in (403, 404), (path, response.status)
    assert b"secret" not in response.body() and b"root:" not in response.body()


def _field(pg, elem_id: str):
    """The text entry of a Gradio component (a textarea for textboxes, an input otherwise)."""
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox])").first


def test_launch_from_the_browser_adds_a_group(page, server, tmp_path, tiny_flux):
    pg, (_, runs, handlers) = page, server
    files = []
    for i in range(3):
        files.append(tmp_path / f"s{i}.png")
        Image.new("RGB", (64, 64), (200, 60 * i, 30)).save(files[-1])
    pg.get_by_role("tab", name="Launch").click()
    assert pg.locator("#launch-res input").input_value() == "64"  # the default model is the toy one
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(30 * 2**20))  # over the per-image limit: refused alone
    caption = tmp_path / "s0.txt"
    caption.write_text("a zxq emblem on an orange background, center")
    pg.locator("#launch-files input[type=file]").set_input_files([str(f) for f in files] + [str(big), str(caption)])
    pg.wait_for_function("() => document.querySelector('#launch-status').innerText.includes('big.png')")
    assert "over the 20 MB limit" in pg.locator("#launch-status").inner_text()
    pg.wait_for_function("() => document.querySelector('#launch-files').innerText.includes('s2')")
    assert "big.png" not in pg.locator("#launch-files").inner_text()
    _field(pg, "launch-name").fill("from_browser")
    _field(pg, "launch-model").fill(str(tiny_flux))
    pg.wait_for_function("() => document.querySelector('#launch-res input').value === '512'")  # not the toy
    _field(pg, "launch-steps").fill("2")
    for arm in ("pissa", "loram"):
        pg.locator("#launch-arms").get_by_label(arm, exact=True).uncheck()
    _field(pg, "launch-res").fill("64")
    _field(pg, "launch-res").press("Enter")
    pg.locator("#launch-btn").click()
    pg.wait_for_function("() => document.querySelector('#launch-status').innerText.includes('started')")
    pg.wait_for_function("() => document.querySelector('#groups-table')?.innerText.includes('from_browser')",
                         timeout=240_000)
    pg.wait_for_function("() => document.querySelector('#launch-status').innerText.includes(': done')",
                         timeout=300_000)
    assert "from_browser" in pg.locator("#jobs-table").inner_text()
    pg.screenshot(path=str(ARTIFACTS / "launch.png"), full_page=True)
    assert (runs / "from_browser" / "lora" / "adapter.safetensors").is_file(), handlers.jobs.log_tail("from_browser")
    staged = runs / ".uploads" / "from_browser" / "images"
    assert (staged / "00.txt").read_text() == caption.read_text() and not (staged / "01.txt").exists()


def _click_run(pg, name: str) -> None:
    """Click the run's row and wait until the selector shows it; a click that lands while the table is being
    redrawn is lost in any browser, so a user (and this) clicks again, at most three times."""
    for attempt in range(3):
        pg.locator("#groups-table").get_by_text(name, exact=True).locator("visible=true").first.click()
        try:
            pg.wait_for_function(f"() => document.querySelector('#group-pick input').value === '{name}'",
                                 timeout=10_000)
            return
        except playwright.TimeoutError:
            continue
    _wait_picked(pg, name)


def _wait_picked(pg, name: str) -> None:
    """Wait until the run selector shows ``name`` (saying what it shows instead when it does not)."""
    try:
        pg.wait_for_function(f"() => document.querySelector('#group-pick input').value === '{name}'",
                             timeout=30_000)
    except playwright.TimeoutError:
        shown = pg.locator("#group-pick input").first.input_value()
        raise AssertionError(f"the selector shows {shown!r}, not {name!r}; table: "
                             f"{pg.locator('#groups-table').inner_text()[:300]!r}") from None


@contextlib.contextmanager
def _fresh_page(page):
    """A new tab in the module's browser: the page as a user who opens the UI now sees it."""
    pg = page.context.browser.new_page(viewport={"width": 1280, "height": 1000})
    pg.set_default_timeout(60_000)
    try:
        yield pg
    finally:
        pg.close()


def test_a_run_created_after_start_is_listed_and_every_click_selects_the_row_clicked(page, server):
    """The freeze: the page's first table is the one the server built at start; a click on it must select the
    run that row shows (not the run now at that index), and the selector must accept every listed name."""
    import json

    url, runs, _ = server
    late = runs / "zz_late"
    shutil.copytree(runs / "tiny", late, ignore=shutil.ignore_patterns(".lock"))
    info = json.loads((late / "group.json").read_text())
    (late / "group.json").write_text(json.dumps({**info, "name": "zz_late", "created": time.time()}))
    with _fresh_page(page) as pg:
        errors = []
        pg.on("console", lambda m: errors.append(m.text) if "not in the list of choices" in m.text else None)
        pg.goto(url + "/")
        pg.locator("#groups-table").get_by_text("tiny", exact=True).locator("visible=true").first.click()  # at once, as the page loads
        pg.wait_for_function("() => document.querySelector('#groups-table')?.innerText.includes('zz_late')")
        first = pg.locator("#group-pick input").first.input_value()  # the row under the pointer when it landed
        assert first in ("tiny", "zz_late", "from_browser"), first
        _click_run(pg, "zz_late")
        pg.wait_for_function("() => document.querySelector('#grid-caption').innerText.includes('step 4')")
        _click_run(pg, "tiny")
        assert "not in the list of choices" not in pg.content() and not errors


def test_private_files_are_refused_through_both_routes(page, server):
    url, runs, _ = server
    ckpt = next((runs / "tiny" / "lora" / "checkpoints").glob("step-*"))
    sample = next((runs / "tiny" / "lora" / "samples").glob("step-*/*.png"))
    for rel in (f"{ckpt.relative_to(runs)}/trainer.pt", f"{ckpt.relative_to(runs)}/adapter.safetensors",
                "tiny/lora/metrics.jsonl", "tiny/config.yaml"):
        for route in (f"/runs-file/{rel}", f"/gradio_api/file={runs / rel}"):
            response = page.request.get(url + route, max_redirects=0)
            assert response.status in (403, 404), (route, response.status)
    for route in (f"/runs-file/{sample.relative_to(runs)}", f"/gradio_api/file={sample}"):
        response = page.request.get(url + route)
        assert response.ok and response.body() == sample.read_bytes(), route


def test_new_samples_and_metrics_appear_without_a_click(page, server):
    import json

    url, runs, _ = server
    with _fresh_page(page) as pg:
        pg.goto(url + "/")
        pg.wait_for_function("() => document.querySelector('#groups-table')?.innerText.includes('zz_late')")
        _click_run(pg, "tiny")
        pg.wait_for_function("() => document.querySelector('#grid-caption')?.innerText.includes('step 4 of 4')")
        for arm in ("lora", "loram"):  # what a training run adds at its next sample step
            samples = runs / "tiny" / arm / "samples"
            shutil.copytree(samples / "step-000004", samples / "step-000006")
            with open(runs / "tiny" / arm / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 6, "subject_fidelity": 0.5}) + "\n")
        try:
            pg.wait_for_function("() => document.querySelector('#grid-caption').innerText.includes('step 6 of 6')",
                                 timeout=30_000)
        except playwright.TimeoutError:
            raise AssertionError(f"caption {pg.locator('#grid-caption').inner_text()!r}, picked "
                                 f"{pg.locator('#group-pick input').first.input_value()!r}, slider "
                                 f"{pg.locator('#step-slider input[type=number]').input_value()!r}") from None
        rows = pg.locator("#step-grid tbody th").all_inner_texts()
        assert len(rows) == 2 and all("step 6" in r and "subject_fidelity 0.5 ↑" in r for r in rows), rows
        pg.get_by_role("tab", name="Curves").click()
        pg.wait_for_function("() => document.body.innerText.includes('subject_fidelity (higher is better)')")


def test_any_page_sees_cancels_and_resumes_a_launched_job(page, server, tmp_path, tiny_flux):
    """The job belongs to the server (its table in the runs folder), not to the tab that launched it."""
    from fluxlora.rundir import GroupDir
    from webui.launch import LaunchForm, stage

    url, runs, handlers = server
    images = []
    for i in range(3):
        images.append(tmp_path / f"j{i}.png")
        Image.new("RGB", (64, 64), (30, 80 * i, 200)).save(images[-1])
    form = LaunchForm(name="long_job", images=images, trigger="zxq", arms=["lora"], rank=2, steps=5000,
                      resolution=64, model_path=str(tiny_flux))
    handlers.jobs.start("long_job", stage(form, runs))  # as if launched from another tab
    arm = GroupDir(runs / "long_job").arm("lora")
    with _fresh_page(page) as pg:
        pg.goto(url + "/")
        pg.get_by_role("tab", name="Launch").click()
        pg.wait_for_function("() => document.querySelector('#jobs-table')?.innerText.includes('long_job')")
        pg.wait_for_function("() => document.querySelector('#job-pick input')?.value === 'long_job'")
        deadline = time.monotonic() + 240
        while (arm.status().get("step") or 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        pg.locator("#cancel-btn").click()
        pg.wait_for_function("() => document.querySelector('#launch-status').innerText.includes('interrupted')",
                             timeout=180_000)
        assert not handlers.jobs.running("long_job") and arm.checkpoints()
        pg.locator("#resume-btn").click()
        pg.wait_for_function("() => document.querySelector('#launch-status').innerText.includes('running')",
                             timeout=120_000)
        assert handlers.jobs.running("long_job")
        pg.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
        pg.locator("#cancel-btn").click()
        pg.wait_for_function("() => document.querySelector('#launch-status').innerText.includes('interrupted')",
                             timeout=180_000)
