"""The Qwen-Image family (diffusers' QwenImagePipeline) through the same trainer as the others, on a tiny random
pipeline built offline: a 3-arm run with shared draws and step 0 equal to the base, validation, the diffusers
and ComfyUI exports read back by independent readers, init_from, exact resume, every other init; and the
family's own math against the pipeline's code: noise, packing and VAE normalisation, caption masks (padding
never reaches the model), the prediction the pipeline integrates, the key map diffusers' kohya reader undoes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_resume_matches_uninterrupted, tiny_config
from family_helpers import generate_one
from fluxlora import adapters, families, kohya
from fluxlora.errors import RunError
from fluxlora.families import qwen_image
from fluxlora.families.pipeline import initial_noise
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_train import weights_hash

METHODS = ["lora", "pissa", "loram"]
PROMPT = "a zxq emblem on a red background, center"
MAX_LEN = 48
GUIDANCE = 2.0  # true_cfg_scale: exercises the negative branch and its norm rescaling
Q = families.get("qwen_image")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are far too small for two threads on a shared two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory, one_thread):
    from fluxlora.toy.tiny_qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image") / "pipe")


def q_config(root, path, subject_dir, **sections):
    model = {"family": "qwen_image", "path": str(path), "max_sequence_length": MAX_LEN}
    adapter = {"rank": 4, "targets": "attn", **sections.pop("adapter", {})}
    sample = {"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT], "guidance": GUIDANCE,
              **sections.pop("sample", {})}
    return tiny_config(root, path, subject_dir, model=model, adapter=adapter, sample=sample, **sections)


@pytest.fixture(scope="module")
def q_run(tmp_path_factory, tiny_q, subject_dir):
    root = tmp_path_factory.mktemp("qrun")
    cfg = q_config(root, tiny_q, subject_dir, adapter={"init": METHODS},
                   data={"validation": {"holdout": 1, "prior_prompts": ["a red circle"], "sigmas": 4}},
                   train={"steps": 3, "lr": 5.0e-2}, export={"formats": ["diffusers", "comfyui"]})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    return tiny_q, GroupDir(root / "runs" / "tiny")


def generate(pipe, steps: int = 2) -> np.ndarray:
    """The sample the trainer makes (its negative is sample.negative_prompt, "" by default)."""
    return np.asarray(generate_one(Q, pipe, PROMPT, MAX_LEN, steps=steps, guidance=GUIDANCE, negative="")).astype(int)


def trained(group, method: str) -> np.ndarray:
    return image(group.arm(method).samples_dir / "step-000003" / "00.png")


def test_arms_share_draws_and_start_at_the_base(q_run):
    path, group = q_run
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics() if "loss" in r] for arm in group.arms()]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 3
    base = generate(Q.load(str(path)))
    for arm in group.arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        # far more than the 1/255 the export checks allow: an adapter lost on reading would show
        assert np.abs(trained(group, arm.name) - base).max() > 8, arm.name


def test_every_arm_writes_its_validation_loss_and_starts_at_the_base_s(q_run):
    _, group = q_run
    for arm in group.arms():
        val = [r for r in arm.metrics() if "val_loss_subject" in r]
        assert [r["step"] for r in val] == [0, 3], arm.name
        assert val[0]["val_loss_subject"] == pytest.approx(val[0]["val_loss_subject_base"], rel=1e-5)
        assert val[0]["val_loss_prior"] < 1e-10 < val[-1]["val_loss_prior"]


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
@pytest.mark.parametrize("method", METHODS)
def test_exports_reload_exactly_in_diffusers(q_run, method, fmt):
    """adapter.safetensors and adapter_comfyui.safetensors through QwenImagePipeline's own load_lora_weights
    (the ComfyUI file through diffusers' kohya reader for Qwen-Image): the trained step-3 image within 1/255."""
    from fluxlora.export import read_metadata

    path, group = q_run
    arm = group.arm(method)
    assert read_metadata(arm.adapter_file)["family"] == "qwen_image"
    pipe = Q.load(str(path))
    before = weights_hash(Q.denoiser(pipe))
    pipe.load_lora_weights(str(arm.export_file(fmt)))
    assert np.abs(generate(pipe) - trained(group, method)).max() <= 1
    assert weights_hash(Q.denoiser(pipe)) == before


@pytest.mark.parametrize("method", METHODS)
def test_comfyui_file_merged_as_comfyui_merges_it_reproduces_the_trained_image(q_run, method):
    """The second independent reader: ComfyUI's name rule and merge W += alpha / rank * up @ down on the
    weights under ComfyUI's Qwen-Image names (diffusers' own), no fluxlora code on the way."""
    from safetensors.torch import load_file

    from qwen_image_helpers import comfy_apply

    path, group = q_run
    pipe = Q.load(str(path))
    model = pipe.transformer
    model.load_state_dict(comfy_apply(model.state_dict(), load_file(str(group.arm(method).export_file("comfyui")))))
    assert np.abs(generate(pipe) - trained(group, method)).max() <= 1


def test_init_from_reads_either_format(q_run, tmp_path, subject_dir):
    path, group = q_run
    for fmt in ("diffusers", "comfyui"):
        cfg = q_config(tmp_path, path, subject_dir, name=f"cont-{fmt}", train={"steps": 1},
                       adapter={"init": "pissa", "init_from": str(group.arm("pissa").export_file(fmt))})
        assert "error" not in run(cfg, warn=lambda m: None)[0]
        start = image(GroupDir(tmp_path / "runs" / f"cont-{fmt}").arm("pissa").samples_dir / "step-000000" / "00.png")
        assert np.abs(start - trained(group, "pissa")).max() <= 1, fmt


def test_resume_reproduces_an_uninterrupted_run(tiny_q, subject_dir, tmp_path):
    def cfg(name, steps):
        return q_config(tmp_path, tiny_q, subject_dir, name=name, adapter={"init": "loram"},
                        train={"steps": steps, "checkpoint_every": 2})

    assert_resume_matches_uninterrupted(tmp_path, cfg, "loram")


def test_every_other_init_method_trains(tiny_q, subject_dir, tmp_path):
    from fluxlora.config import KNOWN_INITS
    from fluxlora.methods import METHODS as METHOD_TABLE, PRIOR_ACTIVATIONS, WHOLE

    # lora_sb and corda_kpm (it reads class images, which this run has none of) have their own tests
    others = [m for m in KNOWN_INITS if m not in METHODS and m != "lora_sb"
              and METHOD_TABLE[m].needs != PRIOR_ACTIVATIONS]
    cfg = q_config(tmp_path, tiny_q, subject_dir, adapter={"init": others}, train={"steps": 2, "lr": 1.0e-2})
    results = run(cfg, warn=lambda m: None)
    assert [r.get("error") for r in results] == [None] * len(others)
    base = generate(Q.load(str(tiny_q)))
    for arm in GroupDir(tmp_path / "runs" / "tiny").arms():
        if METHOD_TABLE[arm.name].start != WHOLE:  # a WHOLE init starts away from the base by design
            assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert arm.adapter_file.is_file()


def test_masks_noise_packing_and_latents_are_the_pipelines(tiny_q, monkeypatch):
    """Caption masks = encode_prompt's; sampling noise = prepare_latents' for that seed; packing inverts with
    _unpack_latents (frame axis included); encode_images = the image-to-image pipeline's _encode_vae_image
    (per-channel mean / std, frame axis) at the posterior mode."""
    from diffusers import QwenImageImg2ImgPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_img2img as img2img

    pipe = Q.load(str(tiny_q))
    prompts = ["a red circle", "a zxq emblem on a blue background in the top left corner"]
    embeds, mask = pipe.encode_prompt(prompts, device="cpu")
    cond = Q.encode_prompts(pipe, prompts, MAX_LEN)
    assert torch.equal(cond.mask[:, :mask.shape[1]], mask.bool()) and not cond.mask[:, mask.shape[1]:].any()
    # the tiny tokenizer spells the system turn in the 34 tokens the pipeline drops: what remains is the caption
    suffix = pipe.prompt_template_encode.split("{}")[1]
    assert cond.mask.sum(1).tolist() == [len(pipe.tokenizer(p + suffix).input_ids) for p in prompts]
    torch.testing.assert_close(cond.embeds[:, :mask.shape[1]], embeds, rtol=0, atol=0)
    c, h, w = Q.latent_shape(pipe, 32)
    assert (c, h, w) == (4, 4, 4) and Q.pixel_multiple(pipe) == 16
    ref = pipe.prepare_latents(1, c, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(3))
    noise = initial_noise(3, c, h, w)
    assert torch.equal(Q.pack(noise), ref)
    assert torch.equal(pipe._unpack_latents(ref, 32, 32, pipe.vae_scale_factor), noise.unsqueeze(2))
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    i2i = QwenImageImg2ImgPipeline(**pipe.components)
    expected = i2i._encode_vae_image(pixels.unsqueeze(2), None).squeeze(2)
    torch.testing.assert_close(Q.encode_images(pipe, pixels), expected, rtol=0, atol=0)


def test_padding_never_reaches_the_model(tiny_q):
    """Captions of different lengths in one batch: each row's encoding and prediction equal its own alone,
    and garbage in the padded positions changes nothing."""
    pipe = Q.load(str(tiny_q))
    prompts = ["a red circle", "a zxq emblem on a blue background in the top left corner"]
    both = Q.encode_prompts(pipe, prompts, MAX_LEN)
    alone = [Q.encode_prompts(pipe, [p], MAX_LEN) for p in prompts]
    lengths = both.mask.sum(1).tolist()
    assert lengths[0] < lengths[1] < MAX_LEN
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        batched = Q.predict(pipe.transformer, x, t, Q.condition(both, (4, 4), 1.0))
        garbage = both.rows["embeds"].masked_fill(~both.mask[..., None], 7.0)
        noisy_pad = Q.predict(pipe.transformer, x, t, Q.condition(
            qwen_image.Cond({"embeds": garbage, "mask": both.mask}), (4, 4), 1.0))
        for i, c in enumerate(alone):
            torch.testing.assert_close(both.select([i]).embeds, c.embeds, rtol=1e-5, atol=1e-6)
            own = Q.predict(pipe.transformer, x[i:i + 1], t[i:i + 1], Q.condition(c, (4, 4), 1.0))
            torch.testing.assert_close(batched[i:i + 1], own, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(noisy_pad, batched, rtol=0, atol=0)


def test_prediction_is_the_velocity_the_pipeline_integrates(tiny_q):
    """Euler steps with the family's predict at sigma = timestep / 1000, on the pipeline's schedule (its
    dynamic shift mu), give the pipeline's own latents: the training target n - x0 is what sampling integrates."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    pipe = Q.load(str(tiny_q))
    cond = Q.encode_prompts(pipe, ["a red circle", PROMPT], MAX_LEN)
    noise = Q.pack(torch.cat([initial_noise(s, *Q.latent_shape(pipe, 32)) for s in (0, 1)]))
    embeds, mask = qwen_image.trimmed(cond)
    ref = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, latents=noise.clone(), height=32, width=32,
               num_inference_steps=3, true_cfg_scale=1.0, output_type="latent").images
    sc = pipe.scheduler.config
    mu = calculate_shift(noise.shape[1], sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=mu)
    x, c = noise.clone(), Q.condition(cond, (4, 4), 1.0)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(Q.predict(pipe.transformer, x, (t / 1000).expand(2), c), t, x).prev_sample
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RunError, match="sample.steps >= 2"):  # the pipeline's 1-step schedule is NaN
        generate(pipe, steps=1)


def test_presets_and_the_key_map_cover_the_blocks(tiny_q):
    """attn: the image stream's projections of every block; attn_context adds the text stream's; wide the
    MLPs. Every Linear layer has a kohya key, and diffusers' kohya reader maps each key back to its module."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from fluxlora.formats import loader_warnings

    model = Q.load(str(tiny_q)).transformer
    attn, ctx, wide = (adapters.find_targets(model, Q.target_presets[k]) for k in ("attn", "attn_context", "wide"))
    assert len(attn) == 2 * 4 and len(ctx) == 2 * 8 and len(wide) == 2 * 12
    assert set(attn) < set(ctx) < set(wide) and all(n.startswith("transformer_blocks.") for n in wide)
    out_features = adapters.linear_out_features(model)
    assert kohya.unmappable(sorted(out_features), "qwen_image") == []
    assert loader_warnings(["comfyui"], sorted(out_features), "qwen_image") == []
    state = {}
    for name in out_features:
        key = kohya.PREFIX + kohya.keymap("qwen_image").module(name)[0]
        state.update({f"{key}.lora_down.weight": torch.zeros(1, 1), f"{key}.lora_up.weight": torch.zeros(1, 1),
                      f"{key}.alpha": torch.tensor(1.0)})
    back = _convert_non_diffusers_qwen_lora_to_diffusers(state)
    assert set(back) == {f"transformer.{n}.lora_{ab}.weight" for n in out_features for ab in "AB"}


def test_int8_base_quantizes_the_blocks_and_keeps_the_prediction(tiny_q):
    pytest.importorskip("bitsandbytes")
    pipe, q = Q.load(str(tiny_q)), Q.load(str(tiny_q), quantize="int8")
    swapped = [n for n, m in q.transformer.named_modules() if type(m).__name__ == "Linear8bitLt"]
    assert len(swapped) == 2 * 14  # every Linear of the blocks (modulations included)
    cond = Q.condition(Q.encode_prompts(pipe, [PROMPT], MAX_LEN), (4, 4), 1.0)
    x, t = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    with torch.no_grad():
        a, b = Q.predict(pipe.transformer, x, t, cond), Q.predict(q.transformer, x, t, cond)
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_the_web_uis_generator_reproduces_the_samples(q_run):
    from family_helpers import assert_generate_tab_reproduces_the_samples

    assert_generate_tab_reproduces_the_samples(q_run[1], PROMPT, 2, 3)

