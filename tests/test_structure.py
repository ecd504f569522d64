"""The architecture's seams (docs/architecture.md): the three tables are complete and consistent, the web UI
never reaches the trainer, the torch-free modules stay torch-free, no method name is compared outside its own
module, and the family-owned conditioning behaves as the trainer relies on."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
UI_ALLOWED = {"fluxlora.rundir", "fluxlora.errors", "fluxlora.config", "fluxlora.bench", "fluxlora.threads",
              "fluxlora.metric_info"}
TRAINER = ("fluxlora.runner", "fluxlora.train", "fluxlora.arms", "fluxlora.prepare")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement of ``path`` names (top level or nested)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_web_ui_imports_only_run_folders_errors_config_metrics_the_bench_and_the_thread_policy():
    for path in sorted((ROOT / "webui").glob("*.py")):
        ours = {m for m in imported_modules(path) if m.startswith("fluxlora")}
        assert ours <= UI_ALLOWED, (path.name, ours - UI_ALLOWED)
    code = ("import sys, webui.app, webui.handlers, webui.launch, webui.views, webui.files, webui.grid, webui.jobs, "
            "fluxlora.bench\n"
            f"print([m for m in {TRAINER!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_tables_and_errors_import_no_torch():
    code = ("import sys, fluxlora.errors, fluxlora.config, fluxlora.methods, fluxlora.formats, fluxlora.families, "
            "fluxlora.rundir, fluxlora.metric_info, fluxlora.sweep_config, fluxlora.report\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_no_method_name_is_compared_outside_its_own_module():
    from fluxlora.methods import METHODS

    owners = {"methods.py", "inits.py", "lora_sb.py"}
    found = []
    for path in sorted((ROOT / "fluxlora").rglob("*.py")):
        if path.name in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for operand in [node.left, *node.comparators]:
                    if isinstance(operand, ast.Constant) and operand.value in METHODS:
                        found.append(f"{path.name}:{node.lineno}")
                    if isinstance(operand, ast.Attribute) and operand.attr == "METHOD":
                        found.append(f"{path.name}:{node.lineno}")
    assert not found, found


def test_method_table_matches_its_implementations():
    from fluxlora import inits, methods
    from fluxlora.errors import AdapterError

    weights = {n for n, m in methods.METHODS.items() if m.needs == methods.WEIGHTS}
    assert weights == set(inits.INITS)  # the weight-reading registry is exactly the table's rows
    for name, m in methods.METHODS.items():
        assert m.needs == methods.WEIGHTS or m.needs in methods.PASSES
        assert m.start in (methods.ZERO, methods.OFFSET, methods.WHOLE)
        assert callable(m.init_fn()) and m.layer_kind() is not None
        assert m.check is None or callable(m.check_fn())
        if m.needs == methods.WEIGHTS:
            assert m.init_fn() is inits.INITS[name]
        else:  # initpass.py's per-layer step: layer_init(layer, stat, rank, scale, lr1, gen)
            assert len(inspect.signature(m.layer_init_fn()).parameters) == 6, name
    assert methods.METHODS["lora_sb"].fixed_scale == 1.0 and methods.METHODS["lora_sb"].layer == methods.CORE
    with pytest.raises(AdapterError, match="unknown adapter.init 'nope'; valid:"):
        methods.get("nope")


def test_family_and_format_tables_match_their_implementations():
    from fluxlora import families, formats
    from fluxlora.config import KNOWN_FAMILIES, KNOWN_INITS
    from fluxlora.families.interface import Family
    from fluxlora.methods import METHODS

    assert KNOWN_FAMILIES == tuple(families.SPECS) and KNOWN_INITS == tuple(METHODS)
    for name, spec in families.SPECS.items():
        fam = families.get(name)
        assert isinstance(fam, Family) and fam.name == name
        assert set(fam.target_presets) == {"attn", "attn_context", "wide"}
        assert spec.objective in families.LOSS_WEIGHTINGS
        if spec.kohya_keys:  # a written key map (kohya.KeyMap) for the family's ComfyUI file
            from fluxlora import kohya

            keys = kohya.keymap(name)
            assert all(callable(getattr(keys, m)) for m in ("module", "swapped", "folded", "drops"))
    for fmt in formats.FORMATS.values():
        assert set(fmt.families) <= set(families.SPECS)
        for what in ("write", "read", "detect", "unmappable"):
            assert getattr(fmt, what) is None or callable(fmt.fn(what))
    assert all(formats.for_family(name) == ["diffusers", "comfyui"] for name in families.SPECS)


def test_cond_selects_expands_and_moves_as_the_trainer_expects():
    from fluxlora.families.interface import Cond

    cond = Cond({"embeds": torch.arange(12.0).view(3, 2, 2), "mask": torch.ones(3, 2, dtype=torch.long)},
                {"img_ids": torch.zeros(4, 3), "guidance": 3.5})
    assert len(cond) == 3 and cond.guidance == 3.5
    picked = cond.select(torch.tensor([2, 0]))
    assert torch.equal(picked.embeds[0], cond.embeds[2]) and len(picked) == 2
    one = cond.select(slice(1, 2)).expand(4)
    assert one.embeds.shape == (4, 2, 2) and torch.equal(one.embeds[3], cond.embeds[1])
    half = cond.to("cpu", torch.float16)
    assert half.embeds.dtype == torch.float16 and half.img_ids.dtype == torch.float16
    assert half.mask.dtype == torch.long  # masks and ids that are not floating point keep their dtype
    with pytest.raises(AttributeError, match="no field 'pooled'"):
        cond.pooled


def test_data_repeats_puts_each_image_r_times_in_an_epoch():
    from fluxlora.buckets import epoch_order
    from fluxlora.prepare import Cache, Group
    from fluxlora.train import pick

    n, r = 5, 3
    group = Group((1, 1), torch.arange(n), torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1))
    cache = Cache([group], torch.arange(n)[:, None], repeats=r)
    gen = torch.Generator().manual_seed(0)
    epoch = [int(pick(cache, k, 1, 7, gen)[1]) for k in range(n * r)]
    assert sorted(epoch) == sorted(list(range(n)) * r)  # every image exactly r times
    assert epoch != [int(i) % n for i in range(n * r)]  # shuffled together, not r copies in a row
    plain = Cache([group], cache.caption_idx)  # repeats 1: the order is epoch_order's permutation
    assert [int(pick(plain, k, 1, 7, gen)[1]) for k in range(n)] == epoch_order(n, 0, 7).tolist()


def test_data_repeats_reaches_the_trainer_and_lora_sb_refuses_it(tmp_path, tiny_flux, subject_dir):
    from conftest import tiny_config
    from fluxlora.config import ConfigError
    from fluxlora.runner import run

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, data={"repeats": 2}, train={"steps": 6})
    assert "error" not in run(cfg, warn=lambda m: None)[0]
    sb = tiny_config(tmp_path, tiny_flux, subject_dir, name="sb", data={"repeats": 2},
                     adapter={"init": "lora_sb", "sb_batches": 1})
    with pytest.raises(ConfigError, match="data.repeats=1"):
        run(sb, warn=lambda m: None)
    assert not (tmp_path / "runs" / "sb").exists()


def test_modules_stay_small():
    big = [(p.relative_to(ROOT).as_posix(), n) for p in sorted((ROOT / "fluxlora").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 400]
    assert not big, big
