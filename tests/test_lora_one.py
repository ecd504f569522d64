"""LoRA-One (lora_one.py, docs/methods.md section 10): B0 A0 is the best rank-r approximation of one gradient
descent step, normalised to spectral norm 1 / gamma, checked against an exact SVD; on the tiny FLUX the init
comes from the trainer's gradient pass, the step-0 model is the base with that delta merged (by design), the
base weights stay untouched, the export is a plain rank-r LoRA and resume is exact."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import assert_resume_matches_uninterrupted, method_config
from family_helpers import FLUX
from fluxlora import adapters, inits, lora_one, train
from fluxlora.prepare import prepare
from fluxlora.runner import run
from test_adapters import outputs
from test_lora_ga import gradient_like
from test_lora_sb import reference_gradients
from test_train import weights_hash

RANK = 4


def test_the_product_is_the_normalised_truncated_step():
    spectrum = [3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6]
    G = gradient_like(48, 40, spectrum)  # exact rank 8 < q: the randomized SVD is exact
    A0, B0, stats = lora_one.factors(G.float(), RANK, torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(-G)
    expected = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK] / (S[0] * 16.0)  # unique: no sign ambiguity in a product
    torch.testing.assert_close(B0.double() @ A0.double(), expected, atol=1e-6, rtol=0)
    # balanced factors: A0 A0^T = B0^T B0 = diag(S_r) / (S_1 gamma)
    torch.testing.assert_close(B0.T @ B0, A0 @ A0.T, atol=1e-6, rtol=0)
    assert stats["sigma_1"] == pytest.approx(3.0, rel=1e-5)
    assert stats["energy_r"] == pytest.approx(sum(s * s for s in spectrum[:RANK]) / sum(s * s for s in spectrum))
    with pytest.raises(inits.InitError, match="gradient of this layer's weight is zero"):
        lora_one.factors(torch.zeros(8, 8), 2)


one_config = functools.partial(method_config, "lora_one", RANK)


def test_step_0_is_the_base_with_the_init_step_merged(tmp_path, tiny_flux, subject_dir):
    cfg = one_config(tmp_path, tiny_flux, subject_dir)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model, t = prep.model, cfg.train
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    ref = reference_gradients(prep, cfg, targets)  # plain autograd over the same batches
    before, base_out = weights_hash(model), outputs(model)
    info = adapters.inject(model, "lora_one", RANK, 0.5, targets, seed=t.seed,
                           inputs=adapters.InitInputs(train.init_passes(prep, cfg, "lora_one", targets), t.lr))
    assert not info.has_offset and weights_hash(model) == before
    step0, deltas = outputs(model), {}
    for name in targets:
        layer = model.get_submodule(name)
        A0, B0 = layer.lora_A["subject"].weight.detach(), layer.lora_B["subject"].weight.detach()
        U, S, Vh = torch.linalg.svd(-ref[name].double())
        expected = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK] / (S[0] * 16.0)
        # the tiny layers' gradients are not exactly low-rank: relative to the step's size 1/16
        torch.testing.assert_close((B0 @ A0).double(), expected, atol=2e-3 / 16, rtol=0)
        deltas[name] = info.scale * B0 @ A0
    assert (step0 - base_out).abs().max() > 1e-4  # it starts after the step, by design
    adapters.remove(model, info)
    with torch.no_grad():
        for name in targets:
            model.get_submodule(name).weight += deltas[name]
    torch.testing.assert_close(step0, outputs(model), rtol=0, atol=1e-5)


def test_exports_a_plain_rank_r_lora_and_resumes_exactly(tmp_path, tiny_flux, subject_dir):
    assert [r.get("error") for r in run(one_config(tmp_path, tiny_flux, subject_dir), warn=lambda m: None)] == [None]

    def cfg_steps(name, steps):
        return one_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": steps, "checkpoint_every": 2})

    exported = assert_resume_matches_uninterrupted(tmp_path, cfg_steps, "lora_one")
    assert all(RANK in v.shape and 2 * RANK not in v.shape for v in exported.values())  # no offset half
