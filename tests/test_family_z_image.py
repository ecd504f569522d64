"""The Z-Image family (diffusers' ZImagePipeline) through the same trainer as the others, on a tiny random
pipeline built offline: a 3-arm run with shared draws and step 0 equal to the base, validation, the diffusers
and ComfyUI exports read back by independent readers, init_from, exact resume, every other init; and the
family's own math: padding never reaches the model, the prediction is what the pipeline integrates, the key
map is the one diffusers' single-file converter undoes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_resume_matches_uninterrupted, tiny_config
from family_helpers import generate_one
from fluxlora import adapters, families, kohya
from fluxlora.families import z_image
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_train import weights_hash

METHODS = ["lora", "pissa", "loram"]
PROMPT = "a zxq emblem on a red background, center"
MAX_LEN = 48
GUIDANCE = 2.0  # Z-Image's own CFG scale (pos + g (pos - neg)): exercises the negative branch
Z = families.get("z_image")


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module")
def tiny_z(tmp_path_factory):
    from fluxlora.toy.tiny_z_image import build_tiny_z_image

    return build_tiny_z_image(tmp_path_factory.mktemp("tiny_z") / "pipe")


def z_config(root, path, subject_dir, **sections):
    model = {"family": "z_image", "path": str(path), "max_sequence_length": MAX_LEN}
    adapter = {"rank": 4, "targets": "attn", **sections.pop("adapter", {})}
    sample = {"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT], "guidance": GUIDANCE,
              **sections.pop("sample", {})}
    return tiny_config(root, path, subject_dir, model=model, adapter=adapter, sample=sample, **sections)


@pytest.fixture(scope="module")
def z_run(tmp_path_factory, tiny_z, subject_dir):
    root = tmp_path_factory.mktemp("zrun")
    cfg = z_config(root, tiny_z, subject_dir, adapter={"init": METHODS},
                   data={"validation": {"holdout": 1, "prior_prompts": ["a red circle"], "sigmas": 4}},
                   train={"steps": 3, "lr": 1.0e-2}, export={"formats": ["diffusers", "comfyui"]})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    return tiny_z, GroupDir(root / "runs" / "tiny")


def generate(pipe, steps: int = 2) -> np.ndarray:
    return np.asarray(generate_one(Z, pipe, PROMPT, MAX_LEN, steps=steps, guidance=GUIDANCE, negative="")).astype(int)


def test_arms_share_draws_and_start_at_the_base(z_run):
    path, group = z_run
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics() if "loss" in r] for arm in group.arms()]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 3
    base = generate(Z.load(str(path)))
    for arm in group.arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert np.abs(image(arm.samples_dir / "step-000003" / "00.png") - base).max() > 0, "training changed nothing"


def test_every_arm_writes_its_validation_loss_and_starts_at_the_base_s(z_run):
    _, group = z_run
    for arm in group.arms():
        val = [r for r in arm.metrics() if "val_loss_subject" in r]
        assert [r["step"] for r in val] == [0, 3], arm.name
        assert val[0]["val_loss_subject"] == pytest.approx(val[0]["val_loss_subject_base"], rel=1e-5)
        assert val[0]["val_loss_prior"] < 1e-10 < val[-1]["val_loss_prior"]


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
@pytest.mark.parametrize("method", METHODS)
def test_exports_reload_exactly_in_diffusers(z_run, method, fmt):
    """adapter.safetensors and adapter_comfyui.safetensors through ZImagePipeline's own load_lora_weights
    (the ComfyUI file through diffusers' kohya reader for Z-Image): the trained step-3 image within 1/255."""
    from fluxlora.export import read_metadata

    path, group = z_run
    arm = group.arm(method)
    assert read_metadata(arm.adapter_file)["family"] == "z_image"
    pipe = Z.load(str(path))
    before = weights_hash(Z.denoiser(pipe))
    pipe.load_lora_weights(str(arm.export_file(fmt)))
    assert np.abs(generate(pipe) - image(arm.samples_dir / "step-000003" / "00.png")).max() <= 1
    assert weights_hash(Z.denoiser(pipe)) == before


def test_comfyui_file_applied_to_the_original_checkpoint_reproduces_the_trained_image(z_run):
    """The second independent reader: the file applied to the original checkpoint's names as ComfyUI applies
    it, brought back by diffusers' single-file converter."""
    from safetensors.torch import load_file

    from z_image_helpers import comfy_apply, original_checkpoint, to_diffusers

    path, group = z_run
    arm = group.arm("pissa")
    pipe = Z.load(str(path))
    model = pipe.transformer
    merged = comfy_apply(original_checkpoint(model), load_file(str(arm.export_file("comfyui"))))
    model.load_state_dict(to_diffusers(merged))
    assert np.abs(generate(pipe) - image(arm.samples_dir / "step-000003" / "00.png")).max() <= 1


def test_init_from_reads_either_format(z_run, tmp_path, subject_dir):
    path, group = z_run
    trained = image(group.arm("pissa").samples_dir / "step-000003" / "00.png")
    for fmt in ("diffusers", "comfyui"):
        cfg = z_config(tmp_path, path, subject_dir, name=f"cont-{fmt}", train={"steps": 1},
                       adapter={"init": "pissa", "init_from": str(group.arm("pissa").export_file(fmt))})
        assert "error" not in run(cfg, warn=lambda m: None)[0]
        start = image(GroupDir(tmp_path / "runs" / f"cont-{fmt}").arm("pissa").samples_dir / "step-000000" / "00.png")
        assert np.abs(start - trained).max() <= 1, fmt


def test_resume_reproduces_an_uninterrupted_run(tiny_z, subject_dir, tmp_path):
    def cfg(name, steps):
        return z_config(tmp_path, tiny_z, subject_dir, name=name, adapter={"init": "loram"},
                        train={"steps": steps, "checkpoint_every": 2}, sample={"steps": 1})

    assert_resume_matches_uninterrupted(tmp_path, cfg, "loram")


def test_every_other_init_method_trains(tiny_z, subject_dir, tmp_path):
    from family_helpers import other_base_start_inits

    others = other_base_start_inits(METHODS)
    cfg = z_config(tmp_path, tiny_z, subject_dir, adapter={"init": others}, train={"steps": 2, "lr": 1.0e-2},
                   sample={"steps": 1})
    results = run(cfg, warn=lambda m: None)
    assert [r.get("error") for r in results] == [None] * len(others)
    base = generate(Z.load(str(tiny_z)), steps=1)
    for arm in GroupDir(tmp_path / "runs" / "tiny").arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert arm.adapter_file.is_file()


def test_padding_never_reaches_the_model(tiny_z):
    """Captions of different lengths in one batch: each row's encoding and prediction equal its own alone,
    and garbage in the padded positions changes nothing."""
    pipe = Z.load(str(tiny_z))
    prompts = ["a red circle", "a zxq emblem on a blue background in the top left corner"]
    both = Z.encode_prompts(pipe, prompts, MAX_LEN)
    alone = [Z.encode_prompts(pipe, [p], MAX_LEN) for p in prompts]
    lengths = both.mask.sum(1).tolist()
    assert lengths[0] < lengths[1] < MAX_LEN
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        batched = Z.predict(pipe.transformer, x, t, both)
        garbage = both.rows["embeds"].masked_fill(~both.mask[..., None], 7.0)
        noisy_pad = Z.predict(pipe.transformer, x, t, z_image.Cond({"embeds": garbage, "mask": both.mask}))
        for i, c in enumerate(alone):
            torch.testing.assert_close(both.select([i]).embeds, c.embeds, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batched[i:i + 1], Z.predict(pipe.transformer, x[i:i + 1], t[i:i + 1], c),
                                       rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(noisy_pad, batched, rtol=0, atol=0)


def test_prediction_is_the_velocity_the_pipeline_integrates(tiny_z):
    """Euler steps with the family's predict (negated output at the reversed time 1 - s) give the pipeline's
    own latents: the training target n - x0 is what sampling integrates."""
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    from fluxlora.families.pipeline import initial_noise

    pipe = Z.load(str(tiny_z))
    cond = Z.encode_prompts(pipe, [PROMPT], MAX_LEN)
    noise = initial_noise(0, *Z.latent_shape(pipe, 32))
    ref = pipe(prompt_embeds=z_image.captions(cond), latents=noise.clone(), height=32, width=32,
               num_inference_steps=3, guidance_scale=0.0, output_type="latent").images
    pipe.scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(3))
    x = noise.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(Z.predict(pipe.transformer, x, (t / 1000).view(1), cond), t, x).prev_sample
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
    assert Z.pixel_multiple(pipe) == 8 and Z.latent_shape(pipe, 32) == (16, 8, 8)


def test_presets_and_the_key_map_cover_the_blocks(tiny_z):
    """attn: the attention projections of every block (main layers and both refiners); wide adds the
    feed-forward and the blocks' modulation; every Linear layer has an original-checkpoint name, and that
    table is the one diffusers' single-file converter undoes."""
    from fluxlora.formats import loader_warnings
    from z_image_helpers import original_checkpoint, to_diffusers

    model = Z.load(str(tiny_z)).transformer
    attn = adapters.find_targets(model, Z.target_presets["attn"])
    wide = adapters.find_targets(model, Z.target_presets["wide"])
    blocks = ("layers.", "noise_refiner.", "context_refiner.")
    assert len(attn) == 4 * 4 and all(n.startswith(blocks) for n in attn)
    assert set(attn) < set(wide) and len(wide) == 16 + 3 * 4 + 3  # the context refiner has no modulation
    assert all(n.startswith(blocks) for n in wide) and Z.target_presets["attn_context"] == Z.target_presets["attn"]
    out_features = adapters.linear_out_features(model)
    assert kohya.unmappable(sorted(out_features), "z_image") == []
    back, sd = to_diffusers(original_checkpoint(model)), model.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert loader_warnings(["comfyui"], wide, "z_image") == []
    lines = loader_warnings(["comfyui"], sorted(out_features), "z_image")
    assert len(lines) == 1 and "all_x_embedder.2-1" in lines[0]


def test_int8_base_quantizes_the_blocks_and_keeps_the_prediction(tiny_z):
    pytest.importorskip("bitsandbytes")
    pipe, q = Z.load(str(tiny_z)), Z.load(str(tiny_z), quantize="int8")
    swapped = [n for n, m in q.transformer.named_modules() if type(m).__name__ == "Linear8bitLt"]
    assert len(swapped) == len(adapters.find_targets(pipe.transformer, Z.target_presets["wide"]))
    cond = Z.encode_prompts(pipe, [PROMPT], MAX_LEN)
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    with torch.no_grad():
        a, b = Z.predict(pipe.transformer, x, t, cond), Z.predict(q.transformer, x, t, cond)
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_the_web_uis_generator_reproduces_the_samples(z_run):
    from family_helpers import assert_generate_tab_reproduces_the_samples

    assert_generate_tab_reproduces_the_samples(z_run[1], PROMPT, 2, 3)

