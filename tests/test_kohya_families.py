"""kohya / ComfyUI files of SD3, SDXL and SD 1.5 with every Linear layer adapted (random factors): each file
applied by an independent reader gives the adapted model's output. SDXL / SD 1.5: diffusers' own kohya reader
(``load_lora_weights``). SD3: diffusers has no kohya reader for SD3, so the file is applied the way ComfyUI
applies it, to Stability's checkpoint names, and brought back by diffusers' single-file converter, which is
also the check of our name table itself (tests/kohya_helpers.py)."""

from __future__ import annotations

import pytest
import torch

from fluxlora import adapters, families, kohya, lorafile
from fluxlora.formats import loader_warnings
from kohya_helpers import comfy_apply, mmdit_checkpoint, to_diffusers


def adapted(model, names: list[str], seed: int = 0):
    info = adapters.inject(model, "lora", 2, 0.7, names, skip_init=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return info


def test_sd3_name_table_is_the_one_diffusers_converts(tiny_pipelines):
    """Our fused / swapped MMDiT checkpoint converts back to the very same diffusers weights."""
    sd3 = families.get("sd3")
    model = sd3.load(str(tiny_pipelines("sd3"))).transformer
    back, sd = to_diffusers(mmdit_checkpoint(model)), model.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_sd3_file_applied_as_comfyui_does_is_the_trained_delta(tiny_pipelines, tmp_path):
    sd3 = families.get("sd3")
    model = sd3.load(str(tiny_pipelines("sd3"))).transformer
    out_features = adapters.linear_out_features(model)
    ckpt, blocks = mmdit_checkpoint(model), len(model.transformer_blocks)
    info = adapted(model, sorted(out_features))
    layers = adapters.export_factors(model, info)
    state = kohya.to_kohya(layers, info.scale, out_features, "sd3")
    assert all(k.startswith("lora_unet_") for k in state)
    merged = to_diffusers(comfy_apply(ckpt, state, blocks))
    base = model.state_dict()
    for name, (a, b) in layers.items():
        delta = merged[f"{name}.weight"] - base[f"{name}.base_layer.weight"]
        torch.testing.assert_close(delta, info.scale * b @ a, rtol=1e-4, atol=1e-6)
    back = kohya.from_kohya(state, out_features, "sd3", hint=set(layers))
    for name, (a, b) in layers.items():
        a2, b2, s2 = back[name]
        torch.testing.assert_close(s2 * b2 @ a2, info.scale * b @ a)
    assert loader_warnings(["comfyui"], sorted(out_features), "sd3") == []


@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_unet_file_read_by_diffusers_kohya_reader_gives_the_adapted_output(name, tiny_pipelines, tmp_path):
    from fluxlora import export

    family = families.get(name)
    path = tiny_pipelines(name)
    pipe = family.load(str(path))
    out_features = adapters.linear_out_features(pipe.unet)
    lost = [n for n in out_features if n.startswith("add_embedding.")]  # SDXL's: misread by diffusers
    assert bool(lost) == (name == "sdxl")
    names = sorted(n for n in out_features if n not in lost)
    info = adapted(pipe.unet, names)
    state = kohya.to_kohya(adapters.export_factors(pipe.unet, info), info.scale, out_features, name)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64 if name == "sdxl" else 32, generator=g)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}} if name == "sdxl" else {}
    with torch.no_grad():
        ours = pipe.unet(x, torch.tensor([500]), enc, **extra).sample
    file = tmp_path / "unet.safetensors"
    export.save_kohya_file(file, state, {})
    theirs_pipe = family.load(str(path))
    theirs_pipe.load_lora_weights(str(file))  # diffusers' kohya reader
    with torch.no_grad():
        theirs = theirs_pipe.unet(x, torch.tensor([500]), enc, **extra).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    read = lorafile.read(file, out_features, name).layers  # and ours reads it back
    assert set(read) == set(names)
    assert loader_warnings(["comfyui"], names, name) == []
    if lost:
        lines = loader_warnings(["comfyui", "diffusers"], names + lost, name)
        assert len(lines) == 1 and "add_embedding.linear_1" in lines[0] and "adapter.safetensors" in lines[0]
