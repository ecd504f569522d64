"""The comparison grid and the one-cell comparison as HTML (no gradio, no torch): rows = arms with a header
(method, lr, rank and the step's metrics), columns = prompt x seed with a header; images are served by the
runs-folder file route and sized by the window (a fixed-layout table 100% wide)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from urllib.parse import quote

from fluxlora.metric_info import METRICS
from fluxlora.rundir import ArmDir, GroupDir, read_json, step_name

SHOWN_METRICS = ("subject_fidelity", "dino", "clip_i", "clip_t", "val_loss_subject", "val_loss_prior")
DIFF_GAIN = 4  # the difference image is |arm - base| x 4, so small changes are visible
CSS = """
.cmp-grid { width: 100%; table-layout: fixed; border-collapse: collapse; }
.cmp-grid th, .cmp-grid td { padding: 3px; vertical-align: top; font-size: 12px; }
.cmp-grid thead th { text-align: center; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.cmp-grid thead th:first-child { width: 170px; }
.cmp-grid tbody th { text-align: left; font-weight: normal; }
.cmp-grid img { width: 100%; height: auto; image-rendering: pixelated; display: block; }
.cmp-grid .arm { font-weight: bold; font-size: 14px; }
"""


def _cell_images(arm: ArmDir, step: int) -> tuple[int | None, list[dict], Path | None]:
    """The arm's samples at ``step`` or its latest earlier ones: (shown step, meta images, folder)."""
    shown = [s for s in arm.sample_steps() if s <= step]
    if not shown:
        return None, [], None
    folder = arm.samples_dir / step_name(shown[-1])
    return shown[-1], (read_json(folder / "meta.json", {}) or {}).get("images", []), folder


def columns(group: GroupDir, step: int) -> list[tuple[str, int]]:
    """(prompt, seed) of each column, in the samples' order."""
    for arm in group.arms():
        _, images, _ = _cell_images(arm, step)
        if images:
            return [(im["prompt"], im["seed"]) for im in images]
    return []


def column_labels(group: GroupDir, step: int) -> list[str]:
    return [f"{i + 1}: {p} · seed {s}" for i, (p, s) in enumerate(columns(group, step))]


def _url(runs: Path, route: str, path: Path) -> str:
    return f"{route}/{quote(path.resolve().relative_to(runs.resolve()).as_posix())}"


def step_metrics(arm: ArmDir, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in arm.metrics():
        if record.get("step") == step:
            out.update({k: v for k, v in record.items() if k in SHOWN_METRICS and isinstance(v, (int, float))})
    return out


def arm_header(arm: ArmDir, step: int | None) -> str:
    init, summary = read_json(arm.init_file, {}) or {}, arm.status().get("summary") or {}
    lr = summary.get("lr")
    facts = [f"{init.get('method', arm.name)} · rank {init.get('rank', '-')}" + (f" · lr {lr:.1e}" if lr else "")]
    for key, value in step_metrics(arm, step).items() if step is not None else []:
        arrow = "↑" if METRICS[key].higher_is_better else "↓"
        facts.append(f"{key} {value:.4g} {arrow}")
    where = f"step {step}" if step is not None else "no samples yet"
    return (f'<span class="arm">{html.escape(arm.name)}</span><br>{where}<br>'
            + "<br>".join(html.escape(f) for f in facts))


def grid_html(runs: Path, group: GroupDir, step: int, route: str) -> str:
    cols = columns(group, step)
    head = "".join(f'<th title="{html.escape(p)} · seed {s}">{html.escape(p)}<br>seed {s}</th>' for p, s in cols)
    rows = []
    for arm in group.arms():
        shown, images, folder = _cell_images(arm, step)
        cells = "".join(f'<td><img src="{_url(runs, route, folder / im["file"])}" loading="lazy" '
                        f'title="{html.escape(arm.name)} · step {shown} · seed {im["seed"]} · '
                        f'{html.escape(im["prompt"])}" alt="{html.escape(arm.name)} step {shown}"></td>'
                        for im in images)
        rows.append(f"<tr><th>{arm_header(arm, shown)}</th>{cells}</tr>")
    return (f"<style>{CSS}</style><table class='cmp-grid'><thead><tr><th>arm</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def difference(arm_png: Path, base_png: Path):
    """|arm - base| x DIFF_GAIN as an image (the same size as both)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(arm_png).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(base_png).convert("RGB"), dtype=np.int16)
    return Image.fromarray(np.clip(np.abs(a - b) * DIFF_GAIN, 0, 255).astype(np.uint8))


def compare_html(runs: Path, group: GroupDir, step: int, column: int, diff: bool, route: str) -> str:
    """One cell for the base (every arm's step-0 sample is the base model's image) and each arm, side by side;
    with ``diff`` each arm's difference to the base instead of its image."""
    panels, base = [], None
    for arm in group.arms():
        _, first, folder0 = _cell_images(arm, 0)
        if base is None and column < len(first):
            base = folder0 / first[column]["file"]
    if base is not None:
        panels.append(("base (step 0)", _url(runs, route, base)))
    for arm in group.arms():
        shown, images, folder = _cell_images(arm, step)
        if column >= len(images):
            continue
        png = folder / images[column]["file"]
        src = _data_uri(difference(png, base)) if diff and base is not None else _url(runs, route, png)
        panels.append((f"{arm.name} · step {shown}" + (f" · |arm - base| x {DIFF_GAIN}" if diff else ""), src))
    cells = "".join(f'<td><img src="{src}" title="{html.escape(label)}"><br>{html.escape(label)}</td>'
                    for label, src in panels)
    return f"<style>{CSS}</style><table class='cmp-grid'><tbody><tr>{cells}</tr></tbody></table>"
