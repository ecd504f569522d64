"""The shipped toy base model: loads offline through diffusers, follows prompts, learns the subject."""

from __future__ import annotations

import numpy as np
import pytest

from fluxlora.toy import base_model_dir, detect


@pytest.fixture(scope="module")
def toy_pipe():
    from fluxlora import modelpath
    from fluxlora.families.flux import FAMILY as flux

    return modelpath.load_base(flux, "toy", "fp32", None, "none")


def test_shipped_pipeline_loads_offline_and_generates(toy_pipe):
    from diffusers import FluxPipeline

    from fluxlora import modelpath
    from fluxlora.families.flux import FAMILY as flux

    assert (base_model_dir() / "model_index.json").exists()
    assert isinstance(toy_pipe, FluxPipeline)
    prompts = ["a large red circle on a blue background, center",
               "a large yellow square on a black background, top left"]
    max_len = modelpath.max_sequence_length(flux, "toy", None)
    emb = flux.encode_prompts(toy_pipe, prompts, max_len)
    neg = flux.encode_prompts(toy_pipe, [""], max_len)
    images = flux.generate(toy_pipe, emb, neg, [0, 1], resolution=64, steps=20, guidance=3.5, true_cfg=4.0)
    got = [detect.detect(np.asarray(im)) for im in images]
    assert [d.bg for d in got] == ["blue", "black"]
    assert [d.pos for d in got] == ["center", "top left"]


def test_short_training_raises_subject_fidelity(tmp_path):
    from fluxlora.config import load_config
    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    cfg = load_config("train_configs/toy_subject.yaml", [
        "adapter.init=lora", "train.steps=100", "sample.every=100", "train.checkpoint_every=0",
        f"output_dir={tmp_path}", "sample.seeds=[0]", "sample.prompts=[a zxq emblem on a red background, center]"])
    run(cfg, warn=lambda m: None)
    fid = {r["step"]: r["subject_fidelity"] for r in GroupDir(tmp_path / "toy_subject").arm("lora").metrics()
           if "subject_fidelity" in r}
    # Measured with this config and seed on the shipped base (2026-11-23, CPU, fp32): 0.079 at step 0 ->
    # 0.273 at step 100. A margin of 0.10 (about half the gain) leaves room for BLAS differences across
    # machines while still failing if nothing is learned.
    assert fid[100] > fid[0] + 0.10, fid
