"""LoRA-GA (lora_ga.py, docs/methods.md section 9): A0, B0 from the singular vectors of the loss gradient with the
stable scale, checked against an exact SVD and against peft's own lora_ga_init; on the tiny FLUX the init
comes from the trainer's gradient pass, step 0 is the base, the base is untouched, exact resume."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from conftest import assert_resume_matches_uninterrupted, method_config
from family_helpers import FLUX, run_beside_lora
from fluxlora import adapters, inits, lora_ga, train
from fluxlora.prepare import prepare
from test_adapters import outputs
from test_lora_sb import reference_gradients
from test_train import weights_hash

RANK = 4


def gradient_like(n: int, m: int, spectrum: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(spectrum) V^T with random orthonormal U, V: a matrix whose singular vectors are known."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return (U * torch.tensor(spectrum, dtype=torch.float64)) @ V.T


def test_factors_are_the_gradients_singular_vectors_at_the_stable_scale():
    G = gradient_like(48, 40, [2.0 ** -i for i in range(2 * RANK)])  # exact rank 2r: the randomized SVD is exact
    A0, B0, stats = lora_ga.factors(G.float(), RANK, torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(G)
    c = 48 ** 0.25 / 16 ** 0.5
    assert stats["c"] == pytest.approx(c) and stats["energy_2r"] == pytest.approx(1.0, rel=1e-5)
    # Singular vectors have a sign each: compare the projectors A0^T A0 = c^2 V_r V_r^T, B0 B0^T = c^2 U' U'^T.
    torch.testing.assert_close(A0.double().T @ A0.double(), c * c * Vh[:RANK].T @ Vh[:RANK], atol=1e-5, rtol=0)
    Ub = U[:, RANK:2 * RANK]
    torch.testing.assert_close(B0.double() @ B0.double().T, c * c * Ub @ Ub.T, atol=1e-5, rtol=0)
    with pytest.raises(inits.InitError, match="2 x rank must be in"):
        lora_ga.factors(G.float(), 21)
    with pytest.raises(inits.InitError, match="gradient of this layer's weight is zero"):
        lora_ga.factors(torch.zeros(8, 8), 2)


def peft_factors(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's lora_ga_init (ArB2r, stable, gamma 16) on a Linear whose gradient is G."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.config import LoraGAConfig

    n, m = G.shape
    model = nn.Sequential(nn.Linear(m, n, bias=False))
    model[0]._peft_loraga_grad = G.clone()
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16))
    layer = inject_adapter_in_model(cfg, model)[0]
    return layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()


def test_same_directions_as_peft_which_also_puts_the_singular_values_into_b():
    """peft 0.21: A = V_r^T (unscaled), B = U[:, r:2r] diag(S[r:2r]) c. The authors' code (ours): A = V_r^T c,
    B = U[:, r:2r] c. Same subspaces and the same c on B; peft's B carries S besides."""
    spectrum = [3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6]
    G = gradient_like(32, 24, spectrum, seed=1).float()
    A0, B0, _ = lora_ga.factors(G, RANK, torch.Generator().manual_seed(0))
    A_peft, B_peft = peft_factors(G, RANK)
    c = lora_ga.stable_scale(32)
    torch.testing.assert_close(A0.double().T @ A0.double(), c * c * A_peft.T @ A_peft, atol=1e-5, rtol=0)
    unscaled = B_peft / torch.tensor(spectrum[RANK:2 * RANK], dtype=torch.float64)
    torch.testing.assert_close(B0.double() @ B0.double().T, unscaled @ unscaled.T, atol=1e-5, rtol=0)


ga_config = functools.partial(method_config, "lora_ga", RANK)


def test_init_from_the_trainers_gradient_keeps_step_0_at_the_base(tmp_path, tiny_flux, subject_dir):
    cfg = ga_config(tmp_path, tiny_flux, subject_dir)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model = prep.model
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    ref = reference_gradients(prep, cfg, targets)  # plain autograd over the same batches
    before, base_out = weights_hash(model), outputs(model)
    t = cfg.train
    info = adapters.inject(model, "lora_ga", RANK, 0.5, targets, seed=t.seed,
                           inputs=adapters.InitInputs(train.init_passes(prep, cfg, "lora_ga", targets), t.lr))
    assert info.has_offset and info.init_seconds > 0 and weights_hash(model) == before
    torch.testing.assert_close(outputs(model), base_out, rtol=0, atol=1e-6)  # the offset cancels s B0 A0
    for name in targets:
        layer = model.get_submodule(name)
        A0, B0 = layer.lora_A["subject"].weight.double(), layer.lora_B["subject"].weight.double()
        U, _, Vh = torch.linalg.svd(ref[name].double())
        c = lora_ga.stable_scale(B0.shape[0])
        # the subspaces of the exact SVD (the tiny layers' gradients are not exactly low-rank: loose tolerance)
        torch.testing.assert_close(A0.T @ A0, c * c * Vh[:RANK].T @ Vh[:RANK], atol=2e-3, rtol=0)
        torch.testing.assert_close(B0 @ B0.T, c * c * U[:, RANK:2 * RANK] @ U[:, RANK:2 * RANK].T, atol=2e-3, rtol=0)
    adapters.remove(model, info)
    assert weights_hash(model) == before


def test_a_run_with_lora_starts_both_at_the_base_and_resumes_exactly(tmp_path, tiny_flux, subject_dir):
    cfg = ga_config(tmp_path, tiny_flux, subject_dir, name="two", adapter={"init": ["lora", "lora_ga"]},
                    train={"steps": 3})
    run_beside_lora(cfg, tmp_path / "runs", "lora_ga", 3)

    def cfg_steps(name, steps):
        return ga_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": steps, "checkpoint_every": 2})

    exported = assert_resume_matches_uninterrupted(tmp_path, cfg_steps, "lora_ga")
    assert all(2 * RANK in v.shape for v in exported.values())  # the exact delta: rank 2r with the offset
