"""DoRA (adapter.dora, docs/dora.md): peft's DoRA layer on the LoRA-layer arms, its magnitude trained, in
checkpoints, in both export files, and read back by adapter.init_from; the other layer kinds refused.

The ComfyUI file is checked by ``comfy_weight_decompose``, a line-for-line re-implementation of ComfyUI's
``weight_decompose`` (comfy/weight_adapter/base.py, reached from ``LoRAAdapter.calculate_weight`` in
comfy/weight_adapter/lora.py when a key has ``.dora_scale``), applied to the original checkpoint's (fused,
swapped) weights as ComfyUI's patcher hands them to it: in fp32, strength 1, no extra function."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_resume_matches_uninterrupted, tiny_config
from family_helpers import FLUX
from fluxlora import adapters, dora_layers, export, families, inits, kohya, lorafile
from test_adapters import outputs


def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha):
    """ComfyUI's weight_decompose(dora_scale, weight, lora_diff, alpha, strength=1, fp32, identity)."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: the norm of the weight before the delta
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        weight_norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
        weight_norm = weight_norm.transpose(0, 1)
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm).type(weight.dtype)


def comfy_apply(state: dict, model, family: str, scale_of=None) -> dict[str, torch.Tensor]:
    """Every adapter of a kohya file applied to its original module's weight as ComfyUI does (alpha / rank,
    up @ down, the DoRA rule), the results split back into diffusers modules. The original weight of a key is
    its diffusers parts stacked in row order, halves swapped where the key map says so (the checkpoint
    layouts tests/test_kohya_families.py and tests/test_interop_wide.py check against diffusers' converters).
    ``scale_of(key)``: another dora_scale to apply (a wrong one, to show the check has teeth)."""
    keys, out_features = kohya.keymap(family), adapters.linear_out_features(model)
    known = {m[0]: m[1] for m in map(keys.module, out_features) if m}
    out = {}
    for down_key in [k for k in state if k.endswith(".lora_down.weight")]:
        key = down_key[len(kohya.PREFIX):-len(".lora_down.weight")]
        parts, swapped = known[key], keys.swapped(key, out_features)
        weight = torch.cat([adapters.base_weight(model, p) for p in parts])
        weight = kohya.swap_halves(weight) if swapped else weight
        down, up = state[down_key].float(), state[f"{kohya.PREFIX}{key}.lora_up.weight"].float()
        alpha = float(state[f"{kohya.PREFIX}{key}.alpha"]) / down.shape[0]
        dora_scale = scale_of(key) if scale_of else state[f"{kohya.PREFIX}{key}.dora_scale"].float()
        new = comfy_weight_decompose(dora_scale, weight, up @ down, alpha)
        new = kohya.swap_halves(new) if swapped else new
        out.update(zip(parts, new.split([out_features[p] for p in parts])))
    return out


@torch.no_grad()
def effective_weight(model, name: str) -> torch.Tensor:
    """The weight module ``name`` applies, through its own forward (peft's DoRA layer, or the plain Linear)."""
    layer = model.get_submodule(name)
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    eye = torch.eye(base.in_features)
    y = layer(eye) - (base.bias if base.bias is not None else 0)
    return y.T


def trained_dora(model, targets, seed=0, size=0.2):
    """A DoRA adapter as after some training: factors and magnitudes moved off their init."""
    info = adapters.inject(model, "lora", 2, 0.7, targets, seed=seed, dora=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                step = torch.randn(p.shape, generator=g) * size
                p.mul_(1 + step) if "magnitude" in n else p.add_(step)
    return info


def write(tmp_path, fmt, model, info, family, dtype="fp32"):
    path = tmp_path / f"{fmt}.safetensors"
    export.write(path, fmt, adapters.export_factors(model, info), info.scale, dtype, {"targets": info.targets},
                 adapters.linear_out_features(model), family, dora_layers.export_part(model, info))
    return path


def continued(model, path, family: str, targets, dora=True):
    """A fresh arm on ``model`` started from ``path`` (adapter.init_from)."""
    lf = lorafile.read(path, adapters.linear_out_features(model), family)
    info = adapters.inject(model, "lora", lf.rank, 0.7, targets, skip_init=True, dora=dora)
    adapters.load_factors(model, info, lf.layers, lf.offset)
    return info


# ----- config and training -------------------------------------------------------------------------------

def test_the_config_refuses_dora_for_the_offset_and_core_layer_kinds(tmp_path, tiny_flux, subject_dir):
    from fluxlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"pissa \(layer kind 'pair'\).*step 0 would not be the base") as e:
        tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "pissa"], "dora": True})
    assert "adapter.dora: false" in str(e.value) and "lora, lora_gaussian, lora_one, eva" in str(e.value)
    with pytest.raises(ConfigError, match=r"lora_sb \(layer kind 'core'\)"):
        tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": "lora_sb", "dora": True})
    assert tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "eva"], "dora": True}).adapter.dora
    from fluxlora.formats import loader_warnings  # diffusers' kohya reader drops dora_scale

    blocks = ["transformer_blocks.0.attn.to_q"]
    assert loader_warnings(["diffusers", "comfyui"], blocks, "flux") == []
    (line,) = loader_warnings(["diffusers", "comfyui"], blocks, "flux", dora=True)
    assert "drops every dora_scale" in line and "load adapter.safetensors instead" in line


@pytest.mark.parametrize("method,quantize", [("lora", "none"), ("lora_gaussian", "none"), ("lora", "nf4")])
def test_step0_is_the_base_exactly_and_only_factors_and_magnitude_train(tiny_flux, method, quantize):
    model = FLUX.load(str(tiny_flux), quantize=quantize).transformer
    base = outputs(model)
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    info = adapters.inject(model, method, 4, 0.5, targets, seed=0, dora=True)
    assert torch.equal(outputs(model), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.{w}.subject.weight" for t in targets
                         for w in ("lora_A", "lora_B", "lora_magnitude_vector")}
    assert info.trainable_params == sum(p.numel() for p in adapters.trainable_parameters(model))
    from family_helpers import flux_predict
    from test_adapters import model_inputs

    flux_predict(model, *model_inputs(), 1.0).pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n].abs().sum() > 0 for n in grads if "magnitude" in n or "lora_B" in n)


def test_an_int8_base_on_the_cpu_is_refused_with_the_fix(tiny_flux):
    """peft re-creates a CPU int8 weight in every DoRA forward, and bitsandbytes then loses its row scales."""
    model = FLUX.load(str(tiny_flux), quantize="int8").transformer
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    with pytest.raises(adapters.AdapterError, match="int8 .* on the CPU.*fix: train on a GPU"):
        adapters.inject(model, "lora", 4, 0.5, targets, seed=0, dora=True)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]


def test_a_whole_start_sets_the_magnitude_from_the_final_factors(tiny_flux, monkeypatch):
    """An init whose product is not zero (lora_one's start, WHOLE): peft set m = ||W|| when the layer was
    created, before our init wrote A and B; m is set again from them, so step 0 is W + s B0 A0 as without DoRA."""
    plain = inits.lora

    def whole(W, rank, scale, generator=None, niter=4):
        r = plain(W, rank, scale, generator=generator)
        return inits.InitResult(r.A0, 0.3 * torch.randn(W.shape[0], rank, generator=generator), r.stats)

    monkeypatch.setattr(inits, "lora", whole)
    runs = {}
    for dora in (False, True):
        model = FLUX.load(str(tiny_flux)).transformer
        base = outputs(model)
        targets = adapters.find_targets(model, FLUX.target_presets["attn"])
        adapters.inject(model, "lora", 4, 0.5, targets, seed=0, dora=dora)
        runs[dora] = outputs(model)
        if dora:
            layer = model.get_submodule(targets[0])
            w = layer.get_base_layer().weight
            start = w + 0.5 * layer.lora_B["subject"].weight @ layer.lora_A["subject"].weight
            m = layer.lora_magnitude_vector["subject"].weight
            torch.testing.assert_close(m, start.norm(dim=1), rtol=1e-6, atol=0)
            assert (m - w.norm(dim=1)).abs().max() > 1e-3  # peft's own m (of W) would be wrong here
    assert (runs[True] - base).abs().max() > 1e-2
    torch.testing.assert_close(runs[True], runs[False], rtol=0, atol=1e-6)


# ----- export files ---------------------------------------------------------------------------------------

def sd3_outputs(model):
    g = torch.Generator().manual_seed(3)
    x, enc, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                     timestep=torch.tensor([500.0])).sample


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_the_diffusers_file_reloads_in_load_lora_weights_and_init_from(name, tiny_flux, tiny_pipelines, tmp_path):
    family = families.get(name)
    path = str(tiny_flux if name == "flux" else tiny_pipelines(name))
    run = outputs if name == "flux" else sd3_outputs
    model = family.load(path).transformer
    base = run(model)
    targets = adapters.find_targets(model, family.target_presets["attn"])
    info = trained_dora(model, targets)
    ours = run(model)
    file = write(tmp_path, "diffusers", model, info, family)
    state, meta = load_file(str(file)), export.read_metadata(file)
    assert {k for k in state if "magnitude" in k} == {f"transformer.{t}.lora_magnitude_vector" for t in targets}
    assert meta["lora_config"]["transformer.use_dora"] is True
    pipe = family.load(path)
    pipe.load_lora_weights(str(file))  # diffusers' own reader, through peft's DoRA layer
    assert (ours - base).abs().max() > 0.01  # the adapter changes the output: the check has teeth
    torch.testing.assert_close(run(pipe.transformer), ours, rtol=0, atol=2e-6)
    other = family.load(path).transformer
    continued(other, file, name, targets)
    torch.testing.assert_close(run(other), ours, rtol=0, atol=2e-6)


def test_the_comfyui_file_gives_pefts_dora_weight_under_comfyuis_rule(tiny_flux, tmp_path):
    """The attn preset: FLUX's fused image qkv (all parts adapted) and the single block's linear1 (q, k, v
    adapted, proj_mlp not: its rows must stay W)."""
    model = FLUX.load(str(tiny_flux)).transformer
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    info = trained_dora(model, targets)
    file = write(tmp_path, "comfyui", model, info, FLUX)
    state = load_file(str(file))
    assert state["lora_unet_single_blocks_0_linear1.dora_scale"].shape == (3 * 32 + 128, 1)
    applied = comfy_apply(state, model, "flux")
    assert "single_transformer_blocks.0.proj_mlp" in applied and set(targets) < set(applied)
    worst = max((applied[n] - effective_weight(model, n)).abs().max().item() for n in applied)
    assert worst < 1e-6
    # Teeth: peft's m itself as dora_scale (right under LyCORIS' rule, which normalises W + delta) is wrong in
    # ComfyUI, which divides by the base's row norm.
    mags, parts = dora_layers.export_part(model, info).magnitudes, dict(map(kohya.keymap("flux").module, targets))
    naive = comfy_apply(state, model, "flux", lambda key: torch.cat(
        [mags.get(p, adapters.base_weight(model, p).norm(dim=1)) for p in parts[key]]).unsqueeze(1))
    assert max((naive[n] - effective_weight(model, n)).abs().max().item() for n in targets) > 1e-3
    other = FLUX.load(str(tiny_flux)).transformer  # adapter.init_from the ComfyUI file
    continued(other, file, "flux", targets)
    torch.testing.assert_close(outputs(other), outputs(model), rtol=0, atol=2e-6)


def test_sd3_swapped_final_layer_and_every_linear_under_comfyuis_rule(tiny_pipelines, tmp_path):
    sd3 = families.get("sd3")
    model = sd3.load(str(tiny_pipelines("sd3"))).transformer
    names = sorted(adapters.linear_out_features(model))
    assert "norm_out.linear" in names  # (shift, scale) in Stability's layout: the dora_scale halves swap too
    info = trained_dora(model, names, seed=1)
    state = load_file(str(write(tmp_path, "comfyui", model, info, sd3, dtype="bf16")))
    assert state["lora_unet_final_layer_adaLN_modulation_1.dora_scale"].dtype == torch.float32
    applied = comfy_apply(state, model, "sd3")
    worst = max((applied[n] - effective_weight(model, n)).abs().max().item() for n in names)
    assert worst < 3e-3  # bf16 factors (7.9e-4): the direction is the cast delta's; m is exact (next lines)
    state32 = load_file(str(write(tmp_path, "comfyui", model, info, sd3)))
    applied = comfy_apply(state32, model, "sd3")
    assert max((applied[n] - effective_weight(model, n)).abs().max().item() for n in names) < 1e-6


# ----- checkpoints and adapter.init_from ------------------------------------------------------------------

def test_resume_after_a_stop_equals_the_uninterrupted_run_bit_for_bit(tmp_path, tiny_flux, subject_dir):
    def make(name, steps):
        return tiny_config(tmp_path, tiny_flux, subject_dir, name=name, adapter={"init": "lora", "rank": 2,
                                                                                 "dora": True},
                           train={"steps": steps, "lr": 1.0e-2, "checkpoint_every": 2})

    final = assert_resume_matches_uninterrupted(tmp_path, make, "lora")
    mags = {k: v for k, v in final.items() if k.endswith(".lora_magnitude_vector")}
    assert mags and len(mags) * 2 == len([k for k in final if ".lora_" in k and k.endswith(".weight")])
    model = FLUX.load(str(tiny_flux)).transformer
    moved = [(v - adapters.base_weight(model, k[len("transformer."):-len(".lora_magnitude_vector")])
              .norm(dim=1)).abs().max() for k, v in mags.items()]
    assert max(moved) > 1e-4  # the magnitude trained (it starts at ||W||_row)
    meta = export.read_metadata(tmp_path / "runs" / "full" / "lora" / "adapter.safetensors")
    assert meta["dora"] is True and meta["lora_config"]["transformer.use_dora"] is True
    # `fluxlora export` rebuilds the DoRA arm from its checkpoint and writes the same tensors
    from fluxlora import commands

    arm = tmp_path / "runs" / "full" / "lora"
    trained = {p.name: load_file(p) for p in (arm / "adapter.safetensors", arm / "adapter_comfyui.safetensors")}
    assert commands.export(tmp_path / "runs" / "full", None) == 0
    for name, tensors in trained.items():
        again = load_file(arm / name)
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], v) for k, v in tensors.items()), name


def test_a_dora_run_warns_that_diffusers_kohya_reader_drops_dora_scale(tmp_path, tiny_flux, subject_dir):
    from fluxlora.runner import run

    said = []
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": "lora", "rank": 2, "dora": True},
                      train={"steps": 1})
    assert [r.get("error") for r in run(cfg, warn=said.append)] == [None]
    assert any("drops every dora_scale" in line for line in said), said


def test_files_meet_arms_with_and_without_dora(tiny_flux, tmp_path):
    """A plain LoRA file starts a DoRA arm at that LoRA's model (m = ||W + s B A||); a DoRA file is refused by
    an arm without DoRA, and the base is left pristine."""
    model = FLUX.load(str(tiny_flux)).transformer
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    info = adapters.inject(model, "lora", 2, 0.7, targets, seed=0)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    plain, lora_out = write(tmp_path, "diffusers", model, info, FLUX), outputs(model)
    adapters.remove(model, info)
    base = outputs(model)
    info = continued(model, plain, "flux", targets)
    torch.testing.assert_close(outputs(model), lora_out, rtol=0, atol=2e-6)
    dora_file = tmp_path / "dora.safetensors"
    write(tmp_path, "comfyui", model, info, FLUX).rename(dora_file)
    adapters.remove(model, info)
    with pytest.raises(adapters.AdapterError, match="set adapter.dora: true"):
        continued(model, dora_file, "flux", targets, dora=False)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert torch.equal(outputs(model), base)
    state = load_file(str(dora_file))  # ComfyUI's input-axis layout (LyCORIS' default): no per-row magnitude
    key = "lora_unet_double_blocks_0_img_attn_proj.dora_scale"
    state[key] = torch.ones(1, state[key].shape[0])
    export.save_kohya_file(tmp_path / "columns.safetensors", state, {})
    with pytest.raises(adapters.AdapterError, match=r"shape \(1, 32\), not one value per output row"):
        lorafile.read(tmp_path / "columns.safetensors", adapters.linear_out_features(model), "flux")
