"""Interop on the tiny FLUX: kohya/ComfyUI key format (exact fused adapters), adapter.init_from in either
format, export options (formats, dtype, truncated-SVD lower rank) and the metadata every file carries.

The comfyui file through diffusers' own kohya reader is tested on a FLUX-width model in
test_interop_wide.py: that reader hard-codes FLUX.1's layer sizes for single blocks' linear1."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from family_helpers import FLUX
from conftest import tiny_config
from fluxlora import adapters, commands, export, kohya, lorafile
from fluxlora.config import dump_config
from fluxlora.formats import FORMATS
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_adapters import outputs


def factors(out_dim, in_dim, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_dim, generator=g), torch.randn(out_dim, r, generator=g)


def test_fused_adapter_is_the_exact_stack_of_the_parts():
    # Double block qkv with v unadapted; single block linear1 with q, k, v, proj_mlp of sizes 4, 4, 4, 16.
    names = {"transformer_blocks.0.attn.to_q": 4, "transformer_blocks.0.attn.to_k": 4,
             "transformer_blocks.0.attn.to_v": 4, "single_transformer_blocks.0.attn.to_q": 4,
             "single_transformer_blocks.0.attn.to_k": 4, "single_transformer_blocks.0.attn.to_v": 4,
             "single_transformer_blocks.0.proj_mlp": 16}
    adapted = [n for n in names if n != "transformer_blocks.0.attn.to_v"]
    layers = {n: factors(names[n], 6, 2, i) for i, n in enumerate(adapted)}
    scale = 0.37
    state = kohya.to_kohya(layers, scale, names, "flux")
    qkv, lin1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    assert set(state) == {f"{k}.{s}" for k in (qkv, lin1) for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for key, parts in ((qkv, ["to_q", "to_k", "to_v"]), (lin1, ["to_q", "to_k", "to_v", "proj_mlp"])):
        down, up, alpha = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], state[f"{key}.alpha"]
        full = [n for n in names if any(n.endswith(p) for p in parts) and
                n.startswith("single" if "single" in key else "transformer")]
        assert down.shape[0] == 2 * sum(n in layers for n in full)  # ranks summed
        assert alpha.dtype == torch.float32 and float(alpha) == pytest.approx(down.shape[0] * scale)
        expected = torch.cat([layers[n][1] @ layers[n][0] if n in layers else torch.zeros(names[n], 6)
                              for n in full]) * scale
        torch.testing.assert_close(float(alpha) / down.shape[0] * up @ down, expected, rtol=1e-6, atol=1e-6)
    back = kohya.from_kohya(state, names, "flux", hint=set(adapted))
    assert set(back) == set(adapted)
    for n in adapted:  # the block-diagonal structure splits back into the very same factors
        a, b, s = back[n]
        assert torch.equal(a, layers[n][0]) and torch.equal(b, layers[n][1]) and s == pytest.approx(scale)


def test_final_layer_folds_its_scale_and_swaps_shift_and_scale():
    a, b = factors(8, 6, 2, 0)
    state = kohya.to_kohya({"norm_out.linear": (a, b)}, 0.5, {"norm_out.linear": 8}, "flux")
    key = "lora_unet_final_layer_adaLN_modulation_1"
    assert float(state[f"{key}.alpha"]) == 2.0  # alpha = rank: diffusers' reader ignores it here
    up = state[f"{key}.lora_up.weight"]
    torch.testing.assert_close(up, torch.cat([b[4:], b[:4]]) * 0.5)  # BFL: (shift, scale)
    a2, b2, s2 = kohya.from_kohya(state, {"norm_out.linear": 8}, "flux")["norm_out.linear"]
    torch.testing.assert_close(s2 * b2 @ a2, 0.5 * b @ a)


def test_targets_without_kohya_counterpart_are_refused_for_comfyui_only():
    assert kohya.unmappable(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.norm_q",
                             "single_transformer_blocks.3.proj_out", "pos_embed.proj"], "flux") == [
        "transformer_blocks.0.attn.norm_q", "pos_embed.proj"]
    with pytest.raises(adapters.AdapterError, match=r"pos_embed.proj.*export.formats=\[diffusers\]"):
        export.check_formats(["diffusers", "comfyui"], ["x_embedder", "pos_embed.proj"], "flux")
    export.check_formats(["diffusers"], ["pos_embed.proj"], "flux")


def test_truncate_rank_is_the_truncated_svd_with_its_error():
    g = torch.Generator().manual_seed(0)
    layers = {"a": (torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g)),
              "b": (torch.randn(8, 5, generator=g), torch.randn(30, 8, generator=g))}
    res = export.truncate_rank(layers, 3)
    tails, totals = [], []
    for name, (a, b) in layers.items():
        delta = (b @ a).double()
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        new_a, new_b = res.layers[name]
        assert new_a.shape == (3, a.shape[1]) and new_b.shape == (b.shape[0], 3)
        torch.testing.assert_close((new_b @ new_a).double(), best, rtol=1e-5, atol=1e-4)
        err = torch.linalg.norm(delta - best) / torch.linalg.norm(delta)
        assert res.errors[name] == pytest.approx(float(err), rel=1e-6)
        tails.append(float(torch.linalg.norm(delta - best) ** 2)), totals.append(float(torch.linalg.norm(delta) ** 2))
    assert res.overall == pytest.approx((sum(tails) / sum(totals)) ** 0.5, rel=1e-6)
    assert 0 < res.overall < res.worst[1] < 1


def test_foreign_kohya_file_starts_the_arm_at_its_delta(tiny_flux, tmp_path):
    """An sd-scripts style file (one shared down on fused layers, alpha != rank, no metadata) loads as the
    delta it means, checked against merging that delta into a copy of the base weights by hand."""
    model = FLUX.load(str(tiny_flux)).transformer
    out_features = adapters.linear_out_features(model)
    g, rank, state = torch.Generator().manual_seed(3), 4, {}
    fused = {"double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                              "transformer_blocks.0.attn.to_v"],
             "single_blocks_0_linear1": [f"single_transformer_blocks.0.{m}"
                                         for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")],
             "single_blocks_0_linear2": ["single_transformer_blocks.0.proj_out"],
             "final_layer_adaLN_modulation_1": ["norm_out.linear"]}
    merged = copy.deepcopy(model)
    for key, parts in fused.items():
        first = model.get_submodule(parts[0])
        out = sum(out_features[p] for p in parts)
        down, up = 0.3 * torch.randn(rank, first.in_features, generator=g), 0.3 * torch.randn(out, rank, generator=g)
        state |= {f"lora_unet_{key}.lora_down.weight": down, f"lora_unet_{key}.lora_up.weight": up,
                  f"lora_unet_{key}.alpha": torch.tensor(2.0)}
        delta = 2.0 / rank * up @ down
        if key.startswith("final_layer"):
            delta = torch.cat(delta.chunk(2)[::-1])  # BFL (shift, scale) -> diffusers (scale, shift)
        for p, d in zip(parts, delta.split([out_features[p] for p in parts])):
            merged.get_submodule(p).weight.data += d
    path = tmp_path / "foreign.safetensors"
    save_file(state, str(path))
    lf = lorafile.read(path, out_features, "flux")
    dotted = {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv", "single_blocks_0_linear1":
              "single_blocks.0.linear1", "single_blocks_0_linear2": "single_blocks.0.linear2",
              "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}
    comfy = {}  # the same file in ComfyUI's own key style
    for key, value in state.items():
        module, _, kind = key.partition(".")
        comfy[f"diffusion_model.{dotted[module.removeprefix('lora_unet_')]}.{kind}"] = value
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    for name, (a, b, s) in lorafile.read(tmp_path / "comfy.safetensors", out_features, "flux").layers.items():
        assert torch.equal(a, lf.layers[name][0]) and torch.equal(b, lf.layers[name][1]) and s == lf.layers[name][2]
    targets = sorted(n for parts in fused.values() for n in parts)
    assert sorted(lf.layers) == targets and lf.rank == rank and not lf.offset
    lorafile.check(lf, rank, targets, False, "lora", list(out_features))
    info = adapters.inject(model, "lora", rank, 1.0, targets, skip_init=True)
    adapters.load_factors(model, info, lf.layers, lf.offset)
    torch.testing.assert_close(outputs(model), outputs(merged), rtol=0, atol=2e-5)
    assert (outputs(merged) - outputs(FLUX.load(str(tiny_flux)).transformer)).abs().max() > 1e-2


# ----- runs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_flux, subject_dir):
    root = tmp_path_factory.mktemp("first")
    cfg = tiny_config(root, tiny_flux, subject_dir, adapter={"init": ["lora", "loram"], "rank": 4},
                      data={"trigger": "zxq"}, train={"steps": 2, "lr": 1.0e-2})
    assert all("error" not in r for r in run(cfg, warn=lambda m: None))
    return GroupDir(root / "runs" / "tiny")


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
@pytest.mark.parametrize("method", ["lora", "loram"])
def test_init_from_continues_where_the_file_left_off(tmp_path, tiny_flux, subject_dir, first_run, fmt, method):
    file = first_run.arm(method).export_file(fmt)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name="cont", train={"steps": 1},
                      adapter={"init": method, "rank": 4, "init_from": str(file)})
    assert "error" not in run(cfg, warn=lambda m: None)[0]
    arm = GroupDir(tmp_path / "runs" / "cont").arm(method)
    trained = pixels(first_run.arm(method).samples_dir / "step-000002" / "00.png")
    start = pixels(arm.samples_dir / "step-000000" / "00.png")
    assert np.abs(start - trained).max() <= 1
    assert np.abs(start - pixels(first_run.arm(method).samples_dir / "step-000000" / "00.png")).max() > 1
    assert json.loads(arm.init_file.read_text())["init_from"] == str(file)


@pytest.mark.parametrize("change, message", [
    ({"init": "lora", "rank": 4}, "carries the frozen init term of a loram arm.*adapter.init=loram"),
    ({"init": "loram", "rank": 2}, "adapter.rank is 2 but the file's rank is 4 -> fix: set adapter.rank=4"),
    ({"init": "loram", "rank": 4, "targets": "attn_context"},
     r"the config 4 more, e.g. \['transformer_blocks.0.attn.add_k_proj'.*target_modules="),
])
def test_init_from_mismatch_is_a_clear_error(tmp_path, tiny_flux, subject_dir, first_run, change, message):
    file = first_run.arm("loram").export_file("comfyui")
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name="bad", adapter={**change, "init_from": str(file)})
    with pytest.raises(adapters.AdapterError, match=f"adapter.init_from {file} does not fit the config: .*{message}"):
        run(cfg, warn=lambda m: None)
    assert not (tmp_path / "runs" / "bad" / change["init"] / "metrics.jsonl").exists()  # nothing trained


def test_init_from_user_errors_exit_2(tmp_path, tiny_flux, subject_dir, first_run, capsys):
    from fluxlora.cli import main

    file = first_run.arm("lora").export_file("diffusers")
    for name, init_from, expected in (("r", str(file), "adapter.rank=4"),
                                      ("m", str(tmp_path / "nope.safetensors"), "adapter.init_from")):
        cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name=name, adapter={"rank": 8, "init_from": init_from})
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_metadata_in_every_file(first_run, tiny_flux, capsys):
    files = [first_run.arm(a).export_file(f) for a in ("lora", "loram") for f in FORMATS]
    lines = [f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}"
             for p in sorted((tiny_flux / "transformer").glob("*.safetensors"))]
    for path in files:
        meta = export.read_metadata(path)
        loram = "loram" in str(path.parent.name)
        assert meta["base_model"] == str(tiny_flux) and meta["family"] == "flux"
        assert meta["base_model_hash"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
        assert (meta["method"], meta["rank"], meta["export_rank"], meta["offset"]) == (
            ("loram", 4, 8, True) if loram else ("lora", 4, 4, False))
        if meta["format"] == "diffusers":  # the scale is folded into the factors: alpha = rank
            assert meta["alpha"] == meta["export_rank"] and meta["folded_scale"] == meta["scale"]
        else:
            assert meta["alpha"] == meta["export_rank"] * meta["scale"]
        assert meta["trigger"] == "zxq"
        assert meta["steps"] == 2 and len(meta["config_hash"]) == 16 and len(meta["targets"]) == 7
    assert commands.info(files[-1]) == 0
    out = capsys.readouterr().out
    assert "trigger: zxq" in out and "targets: 7 modules (attn.to_k, attn.to_out.0, attn.to_q, attn.to_v)" in out


def test_base_model_hash_is_cached_by_size_and_mtime(tiny_flux, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = export.base_model_hash(str(tiny_flux))
    assert (tmp_path / "fluxlora" / "model_hashes.json").is_file()
    monkeypatch.setattr(export, "_sha256_file", lambda p: pytest.fail("hashed again"))
    assert export.base_model_hash(str(tiny_flux)) == first
    assert export.base_model_hash("black-forest-labs/FLUX.1-dev") is None


def test_export_command_formats_dtype_and_smaller_rank(first_run, capsys):
    root, arm = first_run.root, first_run.arm("loram")
    full = load_file(str(arm.export_file("comfyui")))
    assert commands.export(root, ["loram"], commands.parse_formats(["comfyui,diffusers"]), "fp16", 3) == 0
    out = capsys.readouterr().out
    small = load_file(str(arm.root / "adapter_comfyui-r3.safetensors"))
    assert (arm.root / "adapter-r3.safetensors").is_file()
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    assert small[f"{key}.lora_down.weight"].dtype == torch.float16 and small[f"{key}.alpha"].dtype == torch.float32
    assert small[f"{key}.lora_down.weight"].shape[0] == 9 and full[f"{key}.lora_down.weight"].shape[0] == 24
    # The printed error is the one the file has: ||dW - dW_R|| / ||dW|| of the fused layer in fp32 terms.
    delta = lambda sd: float(sd[f"{key}.alpha"]) / sd[f"{key}.lora_down.weight"].shape[0] * (
        sd[f"{key}.lora_up.weight"].float() @ sd[f"{key}.lora_down.weight"].float())
    err = float(torch.linalg.norm(delta(full) - delta(small)) / torch.linalg.norm(delta(full)))
    meta = export.read_metadata(arm.root / "adapter_comfyui-r3.safetensors")
    assert meta["refactored_from"] == 8 and meta["export_rank"] == 3 and meta["offset"] is False
    assert 0 < err <= meta["refactor_error_max"] + 2e-3
    assert f"{meta['refactor_error']:.3e}" in out and "max over layers" in out
    assert commands.export(root, None, ["comfyui"], None, 4) == 0  # lora's exact file is rank 4 already
    out = capsys.readouterr().out
    assert "lora: its exact export is already rank 4 <= 4; nothing to truncate" in out
    assert "loram: rank 4 relative error" in out
    assert not (first_run.arm("lora").root / "adapter_comfyui-r4.safetensors").exists()
    with pytest.raises(adapters.AdapterError, match="--rank 0 is not between 1 and the exported rank 8"):
        commands.export(root, ["loram"], None, None, 0)
    from fluxlora.runner import RunError

    with pytest.raises(RunError, match="unknown export format 'kohya'"):
        commands.parse_formats(["diffusers,kohya"])
