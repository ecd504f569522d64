"""Model families other than FLUX, through the same trainer: a short 3-arm run per family, step-0
invariance, identical draws across arms, and the export read back by the family's own pipeline's
`load_lora_weights` (tiny pipelines built offline from configs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from family_helpers import FLUX, generate_one, other_base_start_inits
from conftest import assert_resume_matches_uninterrupted, tiny_config
from fluxlora import families
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_train import weights_hash

METHODS = ["lora", "pissa", "loram"]
PROMPT = "a zxq emblem on a red background, center"
FAMILY_NAMES = ["sd3", "sdxl", "sd15"]
MAX_LEN = {"sd3": 24, "sdxl": 77, "sd15": 77}


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_run(request, tmp_path_factory, tiny_pipelines, subject_dir):
    name = request.param
    path = tiny_pipelines(name)
    root = tmp_path_factory.mktemp(f"{name}run")
    cfg = tiny_config(root, path, subject_dir, model={"family": name, "path": str(path),
                                                       "max_sequence_length": MAX_LEN[name]},
                      data={"validation": {"holdout": 1, "prior_prompts": ["a red circle"], "sigmas": 4}},
                      adapter={"init": METHODS, "rank": 4}, train={"steps": 3, "lr": 1.0e-2},
                      sample={"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT], "guidance": 3.0},
                      export={"formats": ["diffusers", "comfyui"]})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    return name, path, GroupDir(root / "runs" / "tiny")


def generate(family, pipe) -> np.ndarray:
    return np.asarray(generate_one(family, pipe, PROMPT, MAX_LEN[family.name], guidance=3.0, negative="")).astype(int)


def test_arms_share_draws_and_start_at_the_base(family_run):
    name, path, group = family_run
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics() if "loss" in r] for arm in group.arms()]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 3
    family = families.get(name)
    base = generate(family, family.load(str(path)))
    for arm in group.arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert np.abs(image(arm.samples_dir / "step-000003" / "00.png") - base).max() > 0, "training changed nothing"


def test_every_arm_writes_its_validation_loss_and_starts_at_the_base_s(family_run):
    _, _, group = family_run
    for arm in group.arms():
        val = [r for r in arm.metrics() if "val_loss_subject" in r]
        assert [r["step"] for r in val] == [0, 3], arm.name
        assert val[0]["val_loss_subject"] == pytest.approx(val[0]["val_loss_subject_base"], rel=1e-5)
        assert val[0]["val_loss_prior"] < 1e-10 < val[-1]["val_loss_prior"]


@pytest.mark.parametrize("method", METHODS)
def test_export_reloads_exactly_in_the_family_pipeline(family_run, method):
    from fluxlora.export import read_metadata

    name, path, group = family_run
    arm = group.arm(method)
    assert read_metadata(arm.adapter_file)["family"] == name
    family = families.get(name)
    pipe = family.load(str(path))
    before = weights_hash(family.denoiser(pipe))
    pipe.load_lora_weights(str(arm.adapter_file))  # the family pipeline's own loader
    assert np.abs(generate(family, pipe) - image(arm.samples_dir / "step-000003" / "00.png")).max() <= 1
    assert weights_hash(family.denoiser(pipe)) == before


@pytest.mark.parametrize("method", METHODS)
def test_comfyui_export_reproduces_the_trained_image(family_run, method):
    """The kohya / ComfyUI file through an independent reader: SDXL / SD 1.5 through diffusers' own kohya
    reader (load_lora_weights); SD3 applied to Stability's checkpoint names as ComfyUI applies it, and brought
    back by diffusers' single-file converter (tests/kohya_helpers.py). Within 1/255 of the trained image."""
    from safetensors.torch import load_file

    from kohya_helpers import comfy_apply, mmdit_checkpoint, to_diffusers

    name, path, group = family_run
    arm = group.arm(method)
    family = families.get(name)
    pipe = family.load(str(path))
    if name == "sd3":
        model = pipe.transformer
        merged = comfy_apply(mmdit_checkpoint(model), load_file(str(arm.export_file("comfyui"))),
                             len(model.transformer_blocks))
        model.load_state_dict(to_diffusers(merged))
    else:
        pipe.load_lora_weights(str(arm.export_file("comfyui")))
    assert np.abs(generate(family, pipe) - image(arm.samples_dir / "step-000003" / "00.png")).max() <= 1


def test_family_specific_options_are_refused(subject_dir, tmp_path):
    from fluxlora.config import ConfigError

    cases = [({"family": "sdxl", "path": "x", "quantize": "int8"}, {}, "model.quantize int8 is for the transformer"),
             ({"family": "sd15", "path": "x"}, {"loss_weighting": "cosmap"}, "is for flow matching"),
             ({"family": "flux", "path": "x"}, {"loss_weighting": "min_snr"}, "min_snr is for the DDPM")]
    for model, train, message in cases:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, "x", subject_dir, model=model, train=train)


def test_min_snr_weights_follow_the_schedule(tiny_pipelines):
    family = families.get("sdxl")
    bound = family.bind(family.load(str(tiny_pipelines("sdxl"))))
    import torch

    u = torch.tensor([0.001, 0.5, 0.999])
    a = bound.schedule["alphas"][bound._timesteps(u)]
    snr = a / (1 - a)
    expected = torch.clamp(snr, max=5.0) / snr  # epsilon prediction
    torch.testing.assert_close(bound.loss_weights("min_snr", u), expected)
    assert bound.loss_weights("min_snr", u)[0] < 1 and bound.loss_weights("none", u).tolist() == [1, 1, 1]


def test_v_prediction_target():
    import torch

    from fluxlora.families.unet import UNetFamily

    alphas = torch.linspace(0.99, 0.01, 1000)
    fam = UNetFamily("sd15", "StableDiffusionPipeline", xl=False, schedule=dict(alphas=alphas, prediction="v_prediction", vae=8))
    x0, noise, u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.75])
    xt, target = fam.noisy(x0, noise, u)
    a = alphas[torch.tensor([250, 750])].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_web_ui_generation_serves_every_family(family_run):
    """The web UI's generator (one loaded base, adapters switched) reproduces the trained samples."""
    from fluxlora.bench import AdapterBench

    name, _, group = family_run
    bench = AdapterBench(group.root)
    for label, img in bench.side_by_side(PROMPT, 0, 2):
        arm = group.arm("lora" if label == "base" else label)
        step = "step-000000" if label == "base" else "step-000003"
        assert np.abs(np.asarray(img).astype(int) - image(arm.samples_dir / step / "00.png")).max() <= 1, (name, label)


def test_conv_targets_are_refused_and_presets_stay_inside_the_blocks(tiny_pipelines, tiny_flux):
    from fluxlora import adapters

    sd15 = families.get("sd15")
    unet = sd15.denoiser(sd15.load(str(tiny_pipelines("sd15"))))
    with pytest.raises(adapters.AdapterError, match="convolution layers.*Linear layers only"):
        adapters.find_targets(unet, ["to_q", "conv1"])
    assert adapters.find_targets(unet, sd15.target_presets["wide"], blocks_only=True)
    model = FLUX.load(str(tiny_flux)).transformer
    wide = adapters.find_targets(model, FLUX.target_presets["wide"], blocks_only=True)
    assert "proj_out" not in wide and "single_transformer_blocks.0.proj_out" in wide  # not the final layer
    assert "proj_out" in adapters.find_targets(model, ["proj_out"])  # named explicitly: allowed


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_other_init_method_trains_on_every_family(name, tiny_pipelines, subject_dir, tmp_path):
    """The remaining registered inits: 2 steps each, step 0 equal to the base, a readable export."""
    others = other_base_start_inits(METHODS)
    path = tiny_pipelines(name)
    cfg = tiny_config(tmp_path, path, subject_dir, model={"family": name, "path": str(path),
                                                           "max_sequence_length": MAX_LEN[name]},
                      adapter={"init": others, "rank": 4}, train={"steps": 2, "lr": 1.0e-2},
                      sample={"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT], "guidance": 3.0})
    results = run(cfg, warn=lambda m: None)
    assert [r.get("error") for r in results] == [None] * len(others)
    group = GroupDir(tmp_path / "runs" / "tiny")
    first = image(group.arm(others[0]).samples_dir / "step-000000" / "00.png")
    for arm in group.arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - first).max() <= 1, arm.name
        assert arm.adapter_file.is_file()


def test_sdxl_resume_reproduces_an_uninterrupted_run(tiny_pipelines, subject_dir, tmp_path):
    """Checkpoints are family-agnostic: stop at 2 + resume to 4 == 4 steps, bit for bit (DDPM family)."""
    path = tiny_pipelines("sdxl")

    def cfg(name, steps):
        return tiny_config(tmp_path, path, subject_dir, name=name, model={"family": "sdxl", "path": str(path)},
                           adapter={"init": "loram", "rank": 4}, train={"steps": steps, "checkpoint_every": 2},
                           sample={"every": 0, "steps": 1, "seeds": [0], "prompts": [PROMPT]})

    assert_resume_matches_uninterrupted(tmp_path, cfg, "loram")


def test_init_from_reads_either_format_of_the_family(family_run, tmp_path, subject_dir):
    """A file of this family in either format (diffusers: "transformer." or "unet." keys; kohya / ComfyUI)
    starts a new arm where it left off: the new arm's step-0 image is the trained one."""
    name, path, group = family_run
    trained = image(group.arm("pissa").samples_dir / "step-000003" / "00.png")
    for fmt in ("diffusers", "comfyui"):
        cfg = tiny_config(tmp_path, path, subject_dir, name=f"cont-{fmt}",
                          model={"family": name, "path": str(path), "max_sequence_length": MAX_LEN[name]},
                          adapter={"init": "pissa", "rank": 4, "init_from": str(group.arm("pissa").export_file(fmt))},
                          train={"steps": 1}, sample={"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT],
                                                      "guidance": 3.0})
        assert "error" not in run(cfg, warn=lambda m: None)[0]
        start = image(GroupDir(tmp_path / "runs" / f"cont-{fmt}").arm("pissa").samples_dir / "step-000000" / "00.png")
        assert np.abs(start - trained).max() <= 1, fmt
