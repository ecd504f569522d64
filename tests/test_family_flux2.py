"""FLUX.2 [klein] through the same trainer (tiny Flux2KleinPipeline built offline): a 3-arm run with identical
draws and step-0 images equal to the base, validation loss, both exports read back by the pipeline's own
`load_lora_weights` (diffusers' FLUX.2 kohya reader for the ComfyUI file), `adapter.init_from`, exact resume,
every other init, the latent layout against the pipeline's own functions, and the kohya name table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_resume_matches_uninterrupted, tiny_config
from family_helpers import generate_one
from fluxlora import adapters, families, kohya
from fluxlora.families.interface import Cond
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_train import weights_hash

METHODS = ["lora", "pissa", "loram"]
PROMPT = "a zxq emblem on a red background, center"
MAX_LEN = 24
SAMPLE = {"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT], "guidance": 3.0}
FAMILY = families.get("flux2")


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def generate(pipe) -> np.ndarray:
    return np.asarray(generate_one(FAMILY, pipe, PROMPT, MAX_LEN, guidance=3.0, negative="")).astype(int)


def flux2_config(root, path, subject_dir, **sections):
    return tiny_config(root, path, subject_dir, model={"family": "flux2", "path": str(path), "max_sequence_length": MAX_LEN},
                       sample=SAMPLE, **sections)


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory):
    from fluxlora.toy.tiny_flux2 import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2") / "pipe")


@pytest.fixture(scope="module")
def flux2_run(tmp_path_factory, tiny_flux2, subject_dir):
    root = tmp_path_factory.mktemp("flux2run")
    cfg = flux2_config(root, tiny_flux2, subject_dir,
                       data={"validation": {"holdout": 1, "prior_prompts": ["a red circle"], "sigmas": 4}},
                       adapter={"init": METHODS, "rank": 4}, train={"steps": 3, "lr": 1.0e-2},
                       export={"formats": ["diffusers", "comfyui"]})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    return GroupDir(root / "runs" / "tiny")


def test_arms_share_draws_and_start_at_the_base(flux2_run, tiny_flux2):
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics() if "loss" in r] for arm in flux2_run.arms()]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 3
    base = generate(FAMILY.load(str(tiny_flux2)))
    for arm in flux2_run.arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert np.abs(image(arm.samples_dir / "step-000003" / "00.png") - base).max() > 0, "training changed nothing"


def test_every_arm_writes_its_validation_loss_and_starts_at_the_base_s(flux2_run):
    for arm in flux2_run.arms():
        val = [r for r in arm.metrics() if "val_loss_subject" in r]
        assert [r["step"] for r in val] == [0, 3], arm.name
        assert val[0]["val_loss_subject"] == pytest.approx(val[0]["val_loss_subject_base"], rel=1e-5)
        assert val[0]["val_loss_prior"] < 1e-10 < val[-1]["val_loss_prior"]


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_both_exports_reload_exactly_in_the_klein_pipeline(flux2_run, tiny_flux2, fmt):
    """adapter.safetensors and adapter_comfyui.safetensors through Flux2KleinPipeline.load_lora_weights
    (the kohya file through diffusers' own FLUX.2 kohya converter): the trained step-3 image, every arm."""
    from fluxlora.export import read_metadata

    for method in METHODS:
        arm = flux2_run.arm(method)
        assert read_metadata(arm.adapter_file)["family"] == "flux2"
        pipe = FAMILY.load(str(tiny_flux2))
        before = weights_hash(pipe.transformer)
        pipe.load_lora_weights(str(arm.export_file(fmt)))
        assert np.abs(generate(pipe) - image(arm.samples_dir / "step-000003" / "00.png")).max() <= 1, method
        assert weights_hash(pipe.transformer) == before


def test_init_from_reads_either_format(flux2_run, tiny_flux2, tmp_path, subject_dir):
    trained = image(flux2_run.arm("pissa").samples_dir / "step-000003" / "00.png")
    for fmt in ("diffusers", "comfyui"):
        cfg = flux2_config(tmp_path, tiny_flux2, subject_dir, name=f"cont-{fmt}", train={"steps": 1},
                           adapter={"init": "pissa", "rank": 4,
                                    "init_from": str(flux2_run.arm("pissa").export_file(fmt))})
        assert "error" not in run(cfg, warn=lambda m: None)[0]
        start = image(GroupDir(tmp_path / "runs" / f"cont-{fmt}").arm("pissa").samples_dir / "step-000000" / "00.png")
        assert np.abs(start - trained).max() <= 1, fmt


def test_resume_reproduces_an_uninterrupted_run(tiny_flux2, subject_dir, tmp_path):
    def cfg(name, steps):
        return tiny_config(tmp_path, tiny_flux2, subject_dir, name=name,
                           model={"family": "flux2", "path": str(tiny_flux2), "max_sequence_length": MAX_LEN},
                           adapter={"init": "loram", "rank": 4}, train={"steps": steps, "checkpoint_every": 2},
                           sample={"every": 0, "steps": 1, "seeds": [0], "prompts": [PROMPT]})

    assert_resume_matches_uninterrupted(tmp_path, cfg, "loram")


def test_every_other_init_method_trains(tiny_flux2, subject_dir, tmp_path):
    from family_helpers import other_base_start_inits

    others = other_base_start_inits(METHODS)
    cfg = flux2_config(tmp_path, tiny_flux2, subject_dir, adapter={"init": others, "rank": 4},
                       train={"steps": 2, "lr": 1.0e-2})
    results = run(cfg, warn=lambda m: None)
    assert [r.get("error") for r in results] == [None] * len(others)
    base = generate(FAMILY.load(str(tiny_flux2)))
    for arm in GroupDir(tmp_path / "runs" / "tiny").arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert arm.adapter_file.is_file()


def test_latents_and_ids_are_the_pipelines(tiny_flux2):
    """Training latents are what the pipeline's own image encoder makes (patchify + batch-norm statistics);
    noise packed by the family gets the tokens and ids of the pipeline's prepare_latents."""
    pipe = FAMILY.load(str(tiny_flux2))
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(FAMILY.encode_images(pipe, px), pipe._encode_vae_image(px, None))
    c, h, w = FAMILY.latent_shape(pipe, 32)
    assert FAMILY.pixel_multiple(pipe) == pipe.vae_scale_factor * 2 and (h, w) == (4, 4)
    noise = torch.randn(2, c, h, w)
    tokens, ids = pipe.prepare_latents(2, c // 4, 32, 32, torch.float32, "cpu", None, latents=noise)
    cond = FAMILY.condition(FAMILY.encode_prompts(pipe, [PROMPT], MAX_LEN), (h, w), 1.0)
    assert torch.equal(FAMILY.pack(noise), tokens) and torch.equal(cond.img_ids[0], ids[0])
    _, txt_ids = pipe.encode_prompt(PROMPT, max_sequence_length=MAX_LEN)
    assert torch.equal(cond.txt_ids, txt_ids)


def test_presets_select_the_intended_layers(tiny_flux2):
    model = FAMILY.load(str(tiny_flux2)).transformer
    pick = {k: adapters.find_targets(model, v, blocks_only=True) for k, v in FAMILY.target_presets.items()}
    double = [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
    assert pick["attn"] == double + ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    assert len(pick["attn_context"]) == 9 and "transformer_blocks.0.attn.to_add_out" in pick["attn_context"]
    block_linears = [n for n in adapters.linear_out_features(model) if n.startswith(("transformer_blocks.",
                                                                                      "single_transformer_blocks."))]
    assert sorted(pick["wide"]) == sorted(block_linears) and len(block_linears) == 14


def test_kohya_file_of_every_block_layer_is_the_adapted_model(tiny_flux2, tmp_path):
    """The wide preset (every Linear of the blocks) with random factors: the kohya file read by diffusers'
    FLUX.2 kohya reader gives the adapted transformer's output, and our reader gives back the same deltas."""
    from fluxlora import export, lorafile

    pipe = FAMILY.load(str(tiny_flux2))
    model = pipe.transformer
    out_features = adapters.linear_out_features(model)
    names = adapters.find_targets(model, FAMILY.target_presets["wide"], blocks_only=True)
    info = adapters.inject(model, "lora", 2, 0.7, names, skip_init=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    layers = adapters.export_factors(model, info)
    state = kohya.to_kohya(layers, info.scale, out_features, "flux2")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in state
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in state
    x, enc = torch.randn(1, 16, 16, generator=g), torch.randn(1, 8, 48, generator=g)
    cond = FAMILY.condition(Cond({"embeds": enc}), (4, 4), 1.0)
    t = torch.tensor([0.6])
    with torch.no_grad():
        ours = FAMILY.predict(model, x, t, cond)
    file = tmp_path / "k.safetensors"
    export.save_kohya_file(file, state, {})
    theirs_pipe = FAMILY.load(str(tiny_flux2))
    theirs_pipe.load_lora_weights(str(file))
    with torch.no_grad():
        theirs = FAMILY.predict(theirs_pipe.transformer, x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    read = lorafile.read(file, out_features, "flux2").layers
    assert set(read) == set(names)
    back = kohya.from_kohya(state, out_features, "flux2", hint=set(layers))
    for name, (a, b) in layers.items():
        a2, b2, s2 = back[name]
        torch.testing.assert_close(s2 * b2 @ a2, info.scale * b @ a)


def bfl_names(double: int, single: int) -> dict[str, str]:
    """Every Linear module of BFL's FLUX.2 checkpoint, underscored -> dotted."""
    out = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
           "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
           "final_layer.adaLN_modulation.1", "final_layer.linear"]
    for i in range(double):
        out += [f"double_blocks.{i}.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    out += [f"single_blocks.{i}.{m}" for i in range(single) for m in ("linear1", "linear2")]
    return {d.replace(".", "_"): d for d in out}


def test_name_table_is_the_one_diffusers_converts(tiny_flux2):
    """BFL's checkpoint written through our table (fused q, k, v; the final norm's halves swapped) converts
    back, by diffusers' single-file converter, to the very same diffusers weights."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = FAMILY.load(str(tiny_flux2)).transformer
    sd, out_features = model.state_dict(), adapters.linear_out_features(model)
    names, keys = bfl_names(len(model.transformer_blocks), len(model.single_transformer_blocks)), kohya.keymap("flux2")
    ckpt = {}
    for name in out_features:
        key, parts = keys.module(name)
        w = torch.cat([sd[f"{p}.weight"] for p in parts])
        ckpt[f"{names[key]}.weight"] = kohya.swap_halves(w) if keys.swapped(key, out_features) else w
    back = convert_flux2_transformer_checkpoint_to_diffusers(ckpt)
    assert set(back) == {f"{n}.weight" for n in out_features}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    from fluxlora.formats import loader_warnings  # diffusers' kohya reader skips the shared modulation layers

    assert loader_warnings(["comfyui"], [n for n in out_features if n.startswith("transformer_blocks.")], "flux2") == []
    (line,) = loader_warnings(["comfyui"], ["single_stream_modulation.linear", "proj_out"], "flux2")
    assert "single_stream_modulation.linear" in line and "proj_out" not in line


def test_the_web_uis_generator_reproduces_the_samples(flux2_run):
    from family_helpers import assert_generate_tab_reproduces_the_samples

    assert_generate_tab_reproduces_the_samples(flux2_run, PROMPT, 2, 3)

