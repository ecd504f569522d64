"""EVA (eva.py, activations.py, docs/methods.md section 11): A0 = the top eigenvectors of the centred second moment
of the layer's inputs, B0 = 0. Checked: the moments and A0 against an exact float64 eigendecomposition of the
centred input matrix; A0's subspace (and signs, and whitening's relative scales) against peft's own EVA on a
small model fed the same inputs; on the tiny FLUX, the trainer's activation pass against the layer inputs
recorded without hooks, step 0 at the base, base untouched, a run next to lora with a reloading export, and
exact resume."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_resume_matches_uninterrupted, method_config
from family_helpers import FLUX, generate_one, run_beside_lora
from fluxlora import activations, adapters, eva, inits, methods, train
from fluxlora.prepare import prepare
from test_adapters import outputs
from test_train import weights_hash

RANK = 4


def structured_inputs(rows: int, m: int, seed: int = 0, spectrum=(10.0, 8, 6, 4, 2, 1),
                      noise: float = 0.01) -> torch.Tensor:
    """Rows with a large mean offset and a few principal directions of the given standard deviations over
    small isotropic noise: centring changes the answer, and the top-4 subspace is well separated."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64))
    z = torch.randn(rows, len(spectrum), generator=g, dtype=torch.float64) * torch.tensor(spectrum,
                                                                                          dtype=torch.float64)
    offset = 30.0 * torch.randn(m, generator=g, dtype=torch.float64) / m ** 0.5
    return z @ basis.T + offset + noise * torch.randn(rows, m, generator=g, dtype=torch.float64)


def moments_of(x: torch.Tensor, chunks: int = 5) -> activations.Moments:
    stat = activations.Moments.empty(x.shape[1])
    for part in x.float().chunk(chunks):
        stat.add(part)
    return stat


def projector(A: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto A's row space (sign- and basis-invariant)."""
    Q, _ = torch.linalg.qr(A.double().T)
    return Q @ Q.T


def test_moments_and_factors_against_an_exact_centred_eigendecomposition():
    x = structured_inputs(400, 24)
    stat = moments_of(x, chunks=7)
    xc = x - x.mean(0)
    assert stat.count == 400
    torch.testing.assert_close(stat.mean, x.mean(0), atol=1e-5, rtol=0)
    ref = xc.T @ xc
    torch.testing.assert_close(stat.m2.double(), ref, atol=1e-6 * float(ref.abs().max()), rtol=0)  # fp32 sums
    A0, B0, stats = eva.factors(stat, RANK, 10)
    assert A0.shape == (RANK, 24) and B0.shape == (10, RANK) and not B0.any()
    lam, V = torch.linalg.eigh(xc.T @ xc)
    top = V[:, -RANK:].flip(1).T
    torch.testing.assert_close(projector(A0), top.T @ top, atol=1e-5, rtol=0)
    torch.testing.assert_close(A0.double() @ A0.double().T, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (A0.gather(1, A0.abs().argmax(1, keepdim=True)) > 0).all()  # peft's sign convention
    assert stats["explained_r"] == pytest.approx(float(lam[-RANK:].sum() / lam.sum()), rel=1e-5)
    # the uncentred second moment's top direction is the offset's: centring matters here
    _, Vu = torch.linalg.eigh(x.T @ x)
    assert float(torch.trace(projector(A0) @ (Vu[:, -1:] @ Vu[:, -1:].T))) < 0.5
    white, _, _ = eva.factors(stat, RANK, 10, whiten=True)
    torch.testing.assert_close(white.double().norm(dim=1), lam[-RANK:].flip(0) ** -0.25, atol=0, rtol=1e-4)


def test_refusals():
    with pytest.raises(inits.InitError, match="rank must be in"):
        eva.factors(moments_of(structured_inputs(50, 8)), 9, 10)
    with pytest.raises(inits.InitError, match="at least 2"):
        eva.factors(moments_of(torch.ones(1, 8), chunks=1), 2, 10)
    with pytest.raises(inits.InitError, match="vary in no direction"):
        eva.factors(moments_of(torch.ones(30, 8)), 2, 10)
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(adapters.AdapterError, match="no activation pass was given"):
        adapters.inject(model, "eva", 2, 1.0, ["0"], inputs=adapters.InitInputs())
    assert methods.get("eva").needs == methods.ACTIVATIONS


def peft_eva(model: nn.Module, batches: list[torch.Tensor], rank: int, whiten: bool) -> dict[str, torch.Tensor]:
    """peft's EVA (rho = 1: no rank redistribution) on ``model``'s Linear layers, fed ``batches``: {name: A}."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=1.0, tau=0.999, whiten=whiten))
    peft_model = get_peft_model(model, cfg)
    initialize_lora_eva_weights(peft_model, batches, forward_fn=lambda mod, inputs: mod(inputs),
                                prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    out = {}
    for name in names:
        layer = peft_model.base_model.model.get_submodule(name)
        assert not layer.lora_B["default"].weight.any()
        out[name] = layer.lora_A["default"].weight.detach().clone()
    return out


@pytest.mark.parametrize("whiten", [False, True])
def test_same_rows_and_signs_as_peft(whiten):
    """peft's incremental PCA reaches the exact centred eigenvectors when nothing it truncates carries
    variance: inputs of rank 4 (plus 1e-3 noise) at rank 4. peft cycles its data until two estimates agree
    (tau), so it is fed the rows as one batch (repeats of it do not change the eigenvectors); ours reads
    them in 6 micro-batches. With whitening peft's singular values count every repeat: relative scales."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 12)).eval()
    x = structured_inputs(480, 24, seed=3, spectrum=(10.0, 7, 5, 3), noise=1e-3).float()
    targets = ["0", "1"]
    with torch.no_grad(), activations.layer_inputs(model, targets) as stats:
        for b in x.chunk(6):
            model(b)
    ours = {n: eva.factors(stats[n], RANK, model.get_submodule(n).out_features, whiten=whiten)[0] for n in targets}
    theirs = peft_eva(model, [x], RANK, whiten)
    for name in targets:
        torch.testing.assert_close(projector(ours[name]), projector(theirs[name]), atol=1e-4, rtol=0)
        norm_ours, norm_theirs = ours[name].norm(dim=1, keepdim=True), theirs[name].norm(dim=1, keepdim=True)
        torch.testing.assert_close(ours[name] / norm_ours, theirs[name] / norm_theirs, atol=1e-3, rtol=0)
        torch.testing.assert_close(norm_ours / norm_ours[0], norm_theirs / norm_theirs[0], atol=0, rtol=1e-4)


def test_peft_on_several_batches_finds_the_same_subspace():
    """Fed 6 batches of inputs with variance outside the top 4 too, peft's truncated incremental estimate
    drifts from the exact subspace by the tail's share; ours is the exact decomposition of all rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16)).eval()
    x = structured_inputs(480, 24, seed=3, spectrum=(10.0, 8, 6, 4, 0.5, 0.2)).float()
    with torch.no_grad(), activations.layer_inputs(model, ["0"]) as stats:
        model(x)
    ours = eva.factors(stats["0"], RANK, 16)[0]
    theirs = peft_eva(model, list(x.chunk(6)), RANK, False)["0"]
    torch.testing.assert_close(projector(ours), projector(theirs), atol=2e-3, rtol=0)


def recorded_inputs(prep, cfg, targets: list[str]) -> dict[str, torch.Tensor]:
    """Every target's input rows over the pass's micro-batches, recorded by swapping each Linear for a
    recording wrapper (no hooks), in float64."""
    model, t = prep.model, cfg.train
    seen = {n: [] for n in targets}

    class Recorder(nn.Module):
        def __init__(self, name, inner):
            super().__init__()
            self.name, self.inner = name, inner

        def forward(self, x):
            seen[self.name].append(x.detach().reshape(-1, x.shape[-1]).double())
            return self.inner(x)

    originals = {n: model.get_submodule(n) for n in targets}
    for n, layer in originals.items():
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, Recorder(n, layer))
    gen = torch.Generator().manual_seed(t.seed)
    with torch.no_grad():
        for micro in range(cfg.adapter.sb_batches):
            batch = train.make_batch(prep, micro, t.batch_size, t.seed, gen)
            train.loss_step(prep, model, batch, gen, t, cfg.data.prior_loss_weight)
    for n, layer in originals.items():
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return {n: torch.cat(rows) for n, rows in seen.items()}


eva_config = functools.partial(method_config, "eva", RANK)


def test_init_from_the_trainers_activation_pass_keeps_step_0_at_the_base(tmp_path, tiny_flux, subject_dir):
    cfg = eva_config(tmp_path, tiny_flux, subject_dir)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model, t = prep.model, cfg.train
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    ref = recorded_inputs(prep, cfg, targets)
    before, base_out = weights_hash(model), outputs(model)
    passes = functools.partial(train.activation_pass, prep, t, targets, cfg.adapter.sb_batches,
                               cfg.data.prior_loss_weight)
    model.train()
    stats = passes()
    assert model.training  # the pass runs in eval mode and restores the mode it found
    for name in targets:
        x = ref[name]
        xc = x - x.mean(0)
        assert stats[name].count == x.shape[0]
        torch.testing.assert_close(stats[name].mean, x.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(stats[name].m2.double(), xc.T @ xc, atol=1e-4 * float((xc.T @ xc).abs().max()),
                                   rtol=0)
    info = adapters.inject(model, "eva", RANK, 0.5, targets, seed=t.seed,
                           inputs=adapters.InitInputs(train.init_passes(prep, cfg, "eva", targets), t.lr))
    assert not info.has_offset and info.init_seconds > 0 and weights_hash(model) == before
    torch.testing.assert_close(outputs(model), base_out, rtol=0, atol=0)  # B0 = 0: exactly the base
    for name in targets:
        layer = model.get_submodule(name)
        A0 = layer.lora_A["subject"].weight.detach()
        assert not layer.lora_B["subject"].weight.any()
        xc = ref[name] - ref[name].mean(0)
        lam, V = torch.linalg.eigh(xc.T @ xc)
        assert float(lam[-RANK - 1] / lam[-RANK]) < 0.99  # a gap: the top-r subspace is well defined
        top = V[:, -RANK:]
        torch.testing.assert_close(projector(A0), top @ top.T, atol=2e-3, rtol=0)
        assert info.layers[name]["tokens"] == ref[name].shape[0]
    adapters.remove(model, info)
    assert weights_hash(model) == before


def test_a_run_with_lora_starts_both_at_the_base_reloads_and_resumes_exactly(tmp_path, tiny_flux, subject_dir):
    cfg = eva_config(tmp_path, tiny_flux, subject_dir, name="two", adapter={"init": ["lora", "eva"]},
                     train={"steps": 3})
    arm, last = run_beside_lora(cfg, tmp_path / "runs", "eva", 3)
    pipe = FLUX.load(str(tiny_flux))
    pipe.load_lora_weights(str(arm.adapter_file))  # the export reloads in diffusers and gives the last sample
    assert np.abs(np.asarray(generate_one(FLUX, pipe, cfg.sample.prompts[0], 24)).astype(int) - last).max() <= 1
    assert "explained_r" in arm.init_file.read_text()

    def cfg_steps(name, steps):
        return eva_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": steps, "checkpoint_every": 2})

    exported = assert_resume_matches_uninterrupted(tmp_path, cfg_steps, "eva")
    assert all(RANK in v.shape and 2 * RANK not in v.shape for v in exported.values())  # plain rank r
