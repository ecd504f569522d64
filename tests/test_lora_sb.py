"""LoRA-SB (lora_sb.py, docs/methods.md section 3) on the tiny FLUX: frozen orthonormal A, B from the truncated SVD
of the approximated first AdamW step, only R trains, the base is never touched, exact resume, refusals."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from family_helpers import FLUX
from conftest import assert_resume_matches_uninterrupted, method_config
from fluxlora import adapters, arms, inits, lora_sb, train
from fluxlora.config import ConfigError
from fluxlora.prepare import prepare
from fluxlora.rundir import GroupDir
from fluxlora.runner import open_group, run
from test_adapters import outputs
from test_train import weights_hash

RANK, LR = 4, 1.0e-2


sb_config = functools.partial(method_config, "lora_sb", RANK, lr=LR)


def inject_sb(prep, cfg):
    model = prep.model
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    t = cfg.train
    inputs = adapters.InitInputs(train.init_passes(prep, cfg, "lora_sb", targets), t.lr / max(1, t.warmup_steps))
    info = adapters.inject(model, "lora_sb", RANK, 0.5, targets, seed=t.seed, inputs=inputs)
    return model, targets, info


def sb_gradients(prep, cfg, targets):
    """The trainer's gradient pass over lora_sb's estimation batches."""
    return train.gradient_pass(prep, cfg.train, targets, cfg.adapter.sb_batches, cfg.data.prior_loss_weight)


def factors_of(model, name):
    layer = model.get_submodule(name)
    return [f[lora_sb.NAME].weight for f in (layer.lora_A, layer.lora_R, layer.lora_B)]


def reference_gradients(prep, cfg, targets):
    """The summed first-step gradient by plain autograd on the target weights (not lora_sb's hooks)."""
    model, t = prep.model, cfg.train
    weights = [model.get_submodule(n).weight for n in targets]
    for w in weights:
        w.requires_grad_(True)
    gen = torch.Generator().manual_seed(t.seed)
    for micro in range(cfg.adapter.sb_batches):
        batch = train.make_batch(prep, micro, t.batch_size, t.seed, gen)
        train.loss_step(prep, model, batch, gen, t, cfg.data.prior_loss_weight)[0].backward()
    grads = {n: w.grad.detach().clone() for n, w in zip(targets, weights)}
    for w in weights:
        w.requires_grad_(False)
        w.grad = None
    return grads


def test_factors_unit_orthonormal_and_truncated_svd():
    G = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    dW = -0.1 * torch.sign(G)
    A, B, R, stats = lora_sb.factors(G.clone(), 6, 0.1, torch.Generator().manual_seed(1))
    assert A.shape == (6, 40) and B.shape == (48, 6) and R.shape == (6, 6)
    torch.testing.assert_close(A @ A.T, torch.eye(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(B.T @ B, torch.eye(6), rtol=0, atol=1e-5)
    U, S, Vh = torch.linalg.svd(dW.double())
    best = (U[:, :6] * S[:6]) @ Vh[:6]
    # A random +-0.1 matrix has a flat spectrum (the hardest case for a randomized SVD): 2e-3 = 2% of an entry.
    torch.testing.assert_close((B @ R @ A).double(), best, rtol=0, atol=2e-3)
    assert stats["energy_share"] == pytest.approx(float(S[:6].square().sum() / dW.square().sum()), rel=1e-3)
    with pytest.raises(inits.InitError, match=r"rank must be in \[1, min\(n, m\)\] = \[1, 40\]"):
        lora_sb.factors(G.clone(), 41, 0.1)
    with pytest.raises(inits.InitError, match="gradient of this layer's weight is zero"):
        lora_sb.factors(torch.zeros(8, 8), 2, 0.1)


def test_init_is_the_truncated_svd_of_the_approximated_first_adamw_step(tmp_path, tiny_flux, subject_dir):
    cfg = sb_config(tmp_path, tiny_flux, subject_dir, train={"warmup_steps": 1})  # eta1 = lr / 1
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model = prep.model
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    ref = reference_gradients(prep, cfg, targets)
    hooked = sb_gradients(prep, cfg, targets)
    for name in targets:  # lora_sb's hook accumulation equals autograd's weight gradient
        torch.testing.assert_close(hooked[name], ref[name], rtol=1e-4, atol=1e-7)
    before, base_out = weights_hash(model), outputs(model)
    model, targets, info = inject_sb(prep, cfg)
    assert info.scale == 1.0 and not info.has_offset and info.init_seconds > 0
    assert weights_hash(model) == before
    eta1 = LR / 1
    for name in targets:
        A, R, B = factors_of(model, name)
        assert not A.requires_grad and not B.requires_grad and R.requires_grad
        torch.testing.assert_close(A @ A.T, torch.eye(RANK), rtol=0, atol=1e-5)
        torch.testing.assert_close(B.T @ B, torch.eye(RANK), rtol=0, atol=1e-5)
        U, S, Vh = torch.linalg.svd(-eta1 * torch.sign(ref[name]).double())
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        # s = 1. Entries of dW1 are +-1e-2; atol 1e-5 = 0.1% of one entry (randomized SVD, 10 iterations).
        torch.testing.assert_close((B @ R @ A).double(), best, rtol=0, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_R." in n for n in trainable)
    assert info.trainable_params == len(targets) * RANK * RANK
    # By design the step-0 model is W + B R A (no offset): equal to the base with that delta merged.
    step0 = outputs(model)
    assert (step0 - base_out).abs().max() > 1e-4
    adapters.remove(model, info)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in targets)
    torch.testing.assert_close(outputs(model), base_out, rtol=0, atol=0)
    assert weights_hash(model) == before


def test_only_r_trains_and_the_base_stays_bit_identical(tmp_path, tiny_flux, subject_dir):
    cfg = sb_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2, "checkpoint_every": 2})
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model = prep.model
    before = weights_hash(model)
    model, targets, info = inject_sb(prep, cfg)
    init = {n: [f.detach().clone() for f in factors_of(model, n)] for n in targets}
    adapters.remove(model, info)
    group = open_group(cfg, resume=False, warn=lambda m: None)
    summary = arms.train_arm(prep, cfg, "lora_sb", group.arm("lora_sb"))
    assert summary["trainable_params"] == len(targets) * RANK * RANK
    assert weights_hash(model) == before  # after init and 2 training steps
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in targets)
    state = load_file(str(group.arm("lora_sb").checkpoints()[-1] / "adapter.safetensors"))
    for name in targets:
        a0, r0, b0 = init[name]
        assert torch.equal(state[f"{name}.lora_A.subject.weight"], a0)
        assert torch.equal(state[f"{name}.lora_B.subject.weight"], b0)
        assert not torch.equal(state[f"{name}.lora_R.subject.weight"], r0)


def test_gradient_checkpointing_and_quantized_bases_give_the_estimate(tmp_path, tiny_flux, subject_dir):
    cfg = sb_config(tmp_path, tiny_flux, subject_dir)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model = prep.model
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    plain = sb_gradients(prep, cfg, targets)
    model.enable_gradient_checkpointing()
    checkpointed = sb_gradients(prep, cfg, targets)
    model.disable_gradient_checkpointing()
    for name in targets:  # recomputation must not count a layer twice
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8)
    # The pass needs no weight gradient, so quantized bases work as they are: a whole int8 run, and the init
    # on an nf4 base (whole nf4 runs are tested in test_train).
    q = sb_config(tmp_path, tiny_flux, subject_dir, name="int8", train={"steps": 2},
                  model={"path": str(tiny_flux), "quantize": "int8", "max_sequence_length": 24})
    result = run(q, warn=lambda m: None)[0]
    assert "error" not in result and result["init_seconds"] > 0, result
    nf4 = sb_config(tmp_path, tiny_flux, subject_dir, name="nf4",
                    model={"path": str(tiny_flux), "quantize": "nf4", "max_sequence_length": 24})
    prep4 = prepare(nf4, torch.device("cpu"), warn=lambda m: None)
    before = weights_hash(prep4.model)
    model4, targets4, info4 = inject_sb(prep4, nf4)
    for name in targets4:
        A, R, B = factors_of(model4, name)
        torch.testing.assert_close(B.T @ B, torch.eye(RANK), rtol=0, atol=1e-5)
        assert torch.isfinite(R).all() and R.abs().max() > 0
    assert weights_hash(model4) == before
    adapters.remove(model4, info4)


def test_multi_arm_with_lora_and_exact_resume(tmp_path, tiny_flux, subject_dir):
    cfg = sb_config(tmp_path, tiny_flux, subject_dir, name="two", adapter={"init": ["lora", "lora_sb"]},
                    train={"steps": 3})
    results = run(cfg, warn=lambda m: None)
    assert [r.get("error") for r in results] == [None, None]
    group = GroupDir(tmp_path / "runs" / "two")
    sums = [[(r["sigma_sum"], r["noise_sum"]) for r in arm.metrics()] for arm in group.arms()]
    assert sums[0] == sums[1] and len(sums[0]) == 3  # the estimation pass draws from its own generator

    def cfg_steps(name, steps):
        return sb_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": steps, "checkpoint_every": 2})

    a = assert_resume_matches_uninterrupted(tmp_path, cfg_steps, "lora_sb")
    assert all(v.shape[0] == RANK or v.shape[1] == RANK for v in a.values())  # plain rank r, no offset


def test_export_files_hold_the_same_plain_rank_r_delta(tmp_path, tiny_flux, subject_dir):
    from fluxlora import export, kohya

    cfg = sb_config(tmp_path, tiny_flux, subject_dir)
    run(cfg, warn=lambda m: None)
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora_sb")
    meta = export.read_metadata(arm.adapter_file)
    config = meta["lora_config"]
    assert meta["method"] == "lora_sb" and config["transformer.init_lora_weights"] is True
    assert config["transformer.r"] == RANK and config["transformer.lora_alpha"] == RANK  # s = 1
    assert meta["offset"] is False and meta["export_rank"] == RANK and meta["alpha"] == RANK
    diffusers_state = load_file(str(arm.adapter_file))
    names = adapters.linear_out_features(FLUX.load(str(tiny_flux)).transformer)
    back = kohya.from_kohya(load_file(str(arm.export_file("comfyui"))), names, "flux")
    assert back
    for name, (a, b, s) in back.items():
        a_d = diffusers_state[f"transformer.{name}.lora_A.weight"]
        b_d = diffusers_state[f"transformer.{name}.lora_B.weight"]
        torch.testing.assert_close(s * b @ a, b_d @ a_d, rtol=0, atol=1e-6)
    from fluxlora import commands

    assert commands.export(tmp_path / "runs" / "tiny", ["lora_sb"]) == 0  # rebuilt from the checkpoint
    again = load_file(str(arm.adapter_file))
    assert again.keys() == diffusers_state.keys() and all(torch.equal(again[k], diffusers_state[k]) for k in again)


def test_refusals(tmp_path, tiny_flux, subject_dir):
    cfg = sb_config(tmp_path, tiny_flux, subject_dir, name="few", adapter={"init": ["lora", "lora_sb"], "sb_batches": 4})
    with pytest.raises(ConfigError, match=r"4 x 1 = 4 distinct subject images, but data.instance_dir "
                                          r"has 3 -> fix: set adapter.sb_batches <= 3"):
        run(cfg, warn=lambda m: None)
    assert not (tmp_path / "runs/few").exists()  # refused before any model loaded: nothing written
    with pytest.raises(adapters.AdapterError, match=r"train.batch_size <= 3"):
        lora_sb.check_data(3, 1, 4, None)
    model = FLUX.load(str(tiny_flux)).transformer
    with pytest.raises(adapters.AdapterError, match="no gradient pass was given"):
        adapters.inject(model, "lora_sb", RANK, 1.0, adapters.find_targets(model, ["to_q"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with pytest.raises(adapters.AdapterError, match="init_from cannot start a lora_sb arm"):
        lora_sb.check_data(3, 1, 1, "x.safetensors")
    big = sb_config(tmp_path, tiny_flux, subject_dir, name="big", adapter={"rank": 40})  # tiny layers: 32 x 32
    with pytest.raises(adapters.AdapterError, match=r"rank must be in \[1, min\(n, m\)\] = \[1, 32\] for lora_sb.*"
                                                    r"got 40"):
        run(big, warn=lambda m: None)  # before any arm trains (the layer shapes need the loaded model)


def test_step0_output_equals_merged_delta(tmp_path, tiny_flux, subject_dir):
    cfg = sb_config(tmp_path, tiny_flux, subject_dir)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model, targets, info = inject_sb(prep, cfg)
    step0 = outputs(model)
    deltas = {}
    for name in targets:
        A, R, B = factors_of(model, name)
        deltas[name] = (B @ R @ A).detach()
    adapters.remove(model, info)
    with torch.no_grad():
        for name in targets:
            model.get_submodule(name).weight += deltas[name]
    torch.testing.assert_close(step0, outputs(model), rtol=0, atol=1e-5)
