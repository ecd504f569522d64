"""Screenshots of the web UI for the README: serve a runs folder, open a run in headless Chromium and save
the Steps grid, the one-cell comparison and the Curves tab as PNGs.

    .venv/bin/python docs/tools/webui_screenshots.py --runs runs --run toy_study/seed0_rank4_lr0.001 --out docs
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path


def serve(runs: Path):
    import uvicorn

    from webui.app import create_app

    app, _ = create_app(runs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", server


def shoot(url: str, run: str, out: Path, step: int | None) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(60_000)
        pg.goto(url + "/")
        pg.wait_for_function("() => document.querySelector('#groups-table')?.innerText.length > 0")
        for _ in range(3):  # a click that lands while the table is redrawn is lost: click again
            pg.locator("#groups-table").get_by_text(run, exact=True).locator("visible=true").first.click()
            try:
                pg.wait_for_function(f"() => document.querySelector('#group-pick input').value === '{run}'",
                                     timeout=10_000)
                break
            except Exception:
                continue
        if step is not None:
            box = pg.locator("#step-slider input[type=number]")
            box.fill(str(step))
            box.press("Enter")
            pg.wait_for_function(f"() => document.querySelector('#grid-caption').innerText.includes('step {step} ')")
        pg.wait_for_function("() => document.querySelectorAll('#compare-out img').length > 1")
        time.sleep(1.0)
        pg.locator("#step-grid").screenshot(path=str(out / "webui_steps.png"))
        pg.locator("#compare-out").screenshot(path=str(out / "webui_compare.png"))
        pg.get_by_role("tab", name="Curves").click()
        time.sleep(3.0)
        pg.screenshot(path=str(out / "webui_curves.png"))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--run", required=True, help="the run as the UI names it, e.g. toy_subject")
    ap.add_argument("--step", type=int, default=None, help="the step to show (default: the latest)")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    url, server = serve(Path(args.runs).resolve())
    try:
        shoot(url, args.run, Path(args.out), args.step)
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
