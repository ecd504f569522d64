"""Model families other than FLUX, through the same trainer: a short multi-arm run per family, step-0
invariance, and the export read back by the family's own pipeline (tiny pipelines built offline)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from test_train import weights_hash
from fluxlora.rundir import GroupDir
from fluxlora.runner import run

METHODS = ["lora", "pissa", "loram"]
PROMPT = "a zxq emblem on a red background, center"


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, tiny_sd3, subject_dir):
    root = tmp_path_factory.mktemp("sd3run")
    cfg = tiny_config(root, tiny_sd3, subject_dir, model={"family": "sd3", "path": str(tiny_sd3),
                                                           "max_sequence_length": 24},
                      adapter={"init": METHODS, "rank": 4}, train={"steps": 3, "lr": 1.0e-2},
                      sample={"every": 0, "steps": 2, "seeds": [0], "prompts": [PROMPT], "guidance": 3.0})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    return cfg, GroupDir(root / "runs" / "tiny")


def test_sd3_arms_share_draws_and_start_at_the_base(sd3_run, tiny_sd3):
    from fluxlora.families import sd3

    cfg, group = sd3_run
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics() if "loss" in r] for arm in group.arms()]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 3
    pipe = sd3.load_pipeline(str(tiny_sd3))
    embeds, pooled = sd3.encode_prompts(pipe, [PROMPT], 24)
    neg = sd3.encode_prompts(pipe, [""], 24)
    base = np.asarray(sd3.generate(pipe, embeds, pooled, neg, seed=0, resolution=32, steps=2, guidance=3.0,
                                   true_cfg=1.0)).astype(int)
    for arm in group.arms():
        assert np.abs(image(arm.samples_dir / "step-000000" / "00.png") - base).max() <= 1, arm.name
        assert np.abs(image(arm.samples_dir / "step-000003" / "00.png") - base).max() > 0, "training changed nothing"


@pytest.mark.parametrize("method", METHODS)
def test_sd3_export_reloads_exactly_in_its_pipeline(sd3_run, tiny_sd3, method):
    from fluxlora.export import read_metadata
    from fluxlora.families import sd3

    cfg, group = sd3_run
    arm = group.arm(method)
    assert not (arm.root / "adapter_comfyui.safetensors").exists()  # kohya keys are FLUX-only
    assert read_metadata(arm.adapter_file)["family"] == "sd3"
    pipe = sd3.load_pipeline(str(tiny_sd3))
    before = weights_hash(pipe.transformer)
    pipe.load_lora_weights(str(arm.adapter_file))  # StableDiffusion3Pipeline's own loader
    embeds, pooled = sd3.encode_prompts(pipe, [PROMPT], 24)
    neg = sd3.encode_prompts(pipe, [""], 24)
    img = sd3.generate(pipe, embeds, pooled, neg, seed=0, resolution=32, steps=2, guidance=3.0, true_cfg=1.0)
    trained = image(arm.samples_dir / "step-000003" / "00.png")
    assert np.abs(np.asarray(img).astype(int) - trained).max() <= 1
    assert weights_hash(pipe.transformer) == before


def test_sd3_comfyui_export_is_refused_in_the_config(tiny_sd3, subject_dir, tmp_path):
    from fluxlora.config import ConfigError

    with pytest.raises(ConfigError, match="not available for the sd3 family"):
        tiny_config(tmp_path, tiny_sd3, subject_dir, model={"family": "sd3", "path": str(tiny_sd3)},
                    export={"formats": ["diffusers", "comfyui"]})
