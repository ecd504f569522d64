"""Init methods inside the model: step-0 equals the base, base untouched, exact export, live gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from family_helpers import FLUX, flux_predict, generate_one
from conftest import tiny_config
from fluxlora import adapters, inits, methods
from fluxlora.families.flux import image_ids
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_train import weights_hash

METHODS = sorted(inits.INITS)


def model_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 16, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 24, 64, generator=g),
            torch.randn(2, 32, generator=g), image_ids(8, 8))


def outputs(model):
    x, sig, emb, pooled, ids = model_inputs()
    with torch.no_grad():
        return flux_predict(model, x, sig, emb, pooled, ids, 1.0)


@pytest.mark.parametrize("quantize", ["none", "int8", "nf4"])
@pytest.mark.parametrize("method", METHODS)
def test_step0_output_equals_base_and_base_untouched(tiny_flux, method, quantize):
    pipe = FLUX.load(str(tiny_flux), quantize=quantize)
    model = pipe.transformer
    base, before = outputs(model), weights_hash(model)
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    info = adapters.inject(model, method, 4, 0.5, targets, seed=0)
    torch.testing.assert_close(outputs(model), base, rtol=0, atol=1e-5)
    assert weights_hash(model) == before
    assert info.has_offset == (methods.METHODS[method].start == methods.OFFSET)
    adapters.remove(model, info)
    torch.testing.assert_close(outputs(model), base, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["pissa", "loram", "olora"])
def test_gradients_reach_both_factors_from_step_one(tiny_flux, method):
    pipe = FLUX.load(str(tiny_flux))
    model = pipe.transformer
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    adapters.inject(model, method, 4, 1.0, targets, seed=0)
    outputs_with_grad = flux_predict(model, *model_inputs()[:4], model_inputs()[4], 1.0)
    outputs_with_grad.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    offset = [p for n, p in model.named_parameters() if f".{adapters.OFFSET}." in n]
    assert offset and not any(p.requires_grad for p in offset)


def test_plain_lora_starves_a_at_step_one(tiny_flux):
    pipe = FLUX.load(str(tiny_flux))
    model = pipe.transformer
    adapters.inject(model, "lora", 4, 1.0, adapters.find_targets(model, FLUX.target_presets["attn"]), seed=0)
    flux_predict(model, *model_inputs()[:4], model_inputs()[4], 1.0).pow(2).mean().backward()
    a_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad]
    assert all(g is None or g.abs().sum() == 0 for g in a_grads)  # B = 0 blocks A's gradient


@pytest.mark.parametrize("method", METHODS + ["lora_sb"])  # lora_sb: plain rank-r (A, B R), no offset
def test_trained_export_reloads_exactly_in_diffusers(tmp_path, tiny_flux, subject_dir, method):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": method, "rank": 4},
                      train={"steps": 3, "lr": 1.0e-2})
    assert "error" not in run(cfg, warn=lambda m: None)[0]
    arm = GroupDir(tmp_path / "runs" / "tiny").arm(method)
    trained = np.asarray(Image.open(arm.samples_dir / "step-000003" / "00.png")).astype(int)
    pipe = FLUX.load(str(tiny_flux))
    base_hash = weights_hash(pipe.transformer)
    pipe.load_lora_weights(str(arm.adapter_file))
    img = generate_one(FLUX, pipe, cfg.sample.prompts[0], 24)
    assert np.abs(np.asarray(img).astype(int) - trained).max() <= 1
    assert weights_hash(pipe.transformer) == base_hash
    stats = arm.init_file.read_text()
    if method == "loram":
        assert '"Q"' in stats and '"beta"' in stats
    if method == "pissa":
        assert "energy_share" in stats
    if method == "lora_sb":
        assert '"sigma_1"' in stats and '"energy_share"' in stats


def test_multi_arm_run_gives_every_arm_the_same_noise(tmp_path, tiny_flux, subject_dir):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "pissa", "loram"], "rank": 4},
                      train={"steps": 3})
    results = run(cfg, warn=lambda m: None)
    assert [r["arm"] for r in results] == ["lora", "pissa", "loram"]
    group = GroupDir(tmp_path / "runs" / "tiny")
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics()] for arm in group.arms()]
    assert sums[0] == sums[1] == sums[2] and len(sums[0]) == 3


def test_loram_rank_one_refused_by_the_config(tmp_path, tiny_flux, subject_dir):
    from fluxlora.config import ConfigError

    with pytest.raises(ConfigError, match="adapter.rank 1 is too small for loram"):
        tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["loram", "lora"], "rank": 1})


def test_an_arm_whose_init_fails_is_reported_and_other_arms_still_run(tmp_path, tiny_flux, subject_dir,
                                                                      monkeypatch):
    def dead_layer(W, rank, scale, **kw):
        raise inits.InitError("loram: var(W) is 0.0 for this layer -> fix: use init 'lora' for it")

    monkeypatch.setattr(inits, "loram", dead_layer)  # the method table resolves its init at call time
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["loram", "lora"], "rank": 2})
    results = run(cfg, warn=lambda m: None)
    assert "var(W) is 0.0" in results[0]["error"]
    assert "error" not in results[1]
    group = GroupDir(tmp_path / "runs" / "tiny")
    assert group.arm("loram").status()["status"] == "failed"
    assert group.arm("lora").status()["status"] == "done"
    from fluxlora.runner import summary_table

    table = summary_table(results).splitlines()
    assert "peak MB" in table[0] and table[2].startswith("loram") and "var(W) is 0.0" in table[2]
    assert table[3].startswith("lora ") and table[3].endswith("done") and results[1]["peak_memory_mb"] > 0
    assert results[1]["lr"] == cfg.train.lr and 0.0 <= results[1]["clip_fraction"] <= 1.0
    assert f"{cfg.train.lr:.1e}" in table[3] and "lr" in table[0] and "clipped" in table[0]


def test_per_arm_overrides(tmp_path, tiny_flux, subject_dir):
    import json

    from fluxlora.config import ConfigError

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir,
                      adapter={"init": ["lora", "pissa"], "rank": 4,
                               "overrides": {"pissa": {"rank": 2, "scaling": "rslora", "lr": 1.0e-4}}})
    run(cfg, warn=lambda m: None)
    group = GroupDir(tmp_path / "runs" / "tiny")
    lora, pissa = (json.loads(group.arm(a).init_file.read_text()) for a in ("lora", "pissa"))
    assert (lora["rank"], lora["scale"]) == (4, 1.0)
    assert pissa["rank"] == 2 and pissa["scale"] == pytest.approx(2 / 2 ** 0.5)
    assert group.arm("pissa").metrics()[0]["lr"] == pytest.approx(1e-4)
    assert group.arm("lora").metrics()[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="not in adapter.init"):
        tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": "lora", "overrides": {"loram": {"rank": 2}}})
