"""Small pure functions of the FLUX family: packing, noising, sigma sampling and shift, loss weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fluxlora.errors import ModelLoadError
from fluxlora.families import flow, flux
from fluxlora.modelpath import resolve
from fluxlora.runner import run


def test_pack_matches_diffusers_layout_and_ids():
    lat = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 4, 4, 6)
    packed = flux.pack(lat)
    assert packed.shape == (2, 2 * 3, 16)
    # token (row 0, col 1) holds the 2x2 patch at latent rows 0-1, cols 2-3, channel-major
    assert torch.equal(packed[0, 1].view(4, 2, 2), lat[0, :, 0:2, 2:4])
    ids = flux.image_ids(4, 6)
    assert ids.shape == (6, 3) and ids[1].tolist() == [0.0, 0.0, 1.0] and ids[3].tolist() == [0.0, 1.0, 0.0]


def test_noisy_endpoints_and_velocity_target():
    x0, n = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    xt, target = flow.noisy(x0, n, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[1], n[1])
    assert torch.allclose(xt[2], 0.75 * x0[2] + 0.25 * n[2])
    assert torch.allclose(target, n - x0)


def test_shift_is_monotone_and_fixes_endpoints():
    s = torch.linspace(0, 1, 11)
    shifted = flow.shift_sigmas(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > s[1:-1])
    assert torch.all(torch.diff(shifted) > 0)
    assert torch.allclose(flow.shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigma_sampling_is_seeded_and_in_range(scheme):
    a = flow.sample_sigmas(256, scheme, torch.Generator().manual_seed(3), 0.0, 1.0, 1.29, 1.0)
    b = flow.sample_sigmas(256, scheme, torch.Generator().manual_seed(3), 0.0, 1.0, 1.29, 1.0)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    if scheme == "logit_normal":  # median of sigmoid(N(0, 1)) is 0.5
        assert abs(float(a.median()) - 0.5) < 0.1


def test_loss_weights():
    s = torch.tensor([0.2, 0.5])
    assert torch.equal(flow.loss_weights("none", s), torch.ones(2))
    assert torch.allclose(flow.loss_weights("sigma_sqrt", s), s ** -2.0)


def test_missing_local_model_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve("./no/such/pipeline")


@pytest.mark.parametrize("train", [
    {"optimizer": "adamw8bit"}, {"gradient_checkpointing": True}, {"mixed_precision": "bf16"},
    {"grad_accum": 2, "batch_size": 2, "lr_scheduler": "cosine", "warmup_steps": 1},
])
def test_training_options_run(tmp_path, tiny_flux, subject_dir, train):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2, **train})
    result = run(cfg, warn=lambda m: None)[0]
    assert "error" not in result and np.isfinite(result["final_loss"])


def test_hub_id_in_offline_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        flux.FAMILY.load(resolve("someorg/not-cached-model"))
