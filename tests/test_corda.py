"""CorDA (corda.py, corda_ipm.py, corda_kpm.py; docs/methods.md section 12): W C' = U S V^T with C' the damped
uncentred input covariance, the adapter starts on the r largest (IPM) or smallest (KPM) components,
A0 = sqrt(S_r / s) V_r^T C'^-1, B0 = U_r sqrt(S_r / s). Checked: the covariance and the factors against a float64
numpy computation; which end of the spectrum each mode takes, on a case whose answer is known by hand; the
factors, the residual base weight and the damping against peft 0.21's own CorDA (hooks, preprocess_corda,
get_peft_model) on a tiny model, both modes, singular covariance included; the refusals; on the tiny FLUX, the
prior pass (only class rows enter), the trainer's inits at the base, and a run of both modes with class images."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from conftest import method_config
from family_helpers import FLUX, generate_one
from fluxlora import activations, adapters, corda, corda_ipm, corda_kpm, methods, train
from fluxlora.config import ConfigError
from fluxlora.errors import InitError
from fluxlora.prepare import prepare
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_adapters import outputs
from test_train import weights_hash

RANK = 3
INIT = {"ipm": corda_ipm.layer_init, "kpm": corda_kpm.layer_init}


def inputs(rows: int, m: int, seed: int = 0, k: int | None = None) -> torch.Tensor:
    """Anisotropic rows (column scales 0.2..3) around a non-zero mean, so the uncentred X^T X differs from the
    centred M2; with ``k``, rows in a random k-dimensional subspace (a singular covariance)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k or m, m, generator=g, dtype=torch.float64) if k else torch.eye(m, dtype=torch.float64)
    z = torch.randn(rows, k or m, generator=g, dtype=torch.float64) @ basis
    return z * torch.linspace(0.2, 3.0, m, dtype=torch.float64) + 0.7


def moments_of(x: torch.Tensor, chunks: int = 4) -> activations.Moments:
    stat = activations.Moments.empty(x.shape[1])
    for part in x.float().reshape(-1, x.shape[-1]).chunk(chunks):
        stat.add(part)
    return stat


def linear(n: int, m: int, seed: int = 1, weight: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(m, n, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight if weight is not None else
                           torch.randn(n, m, generator=torch.Generator().manual_seed(seed)) / math.sqrt(m))
    return layer


def reference(W, x, rank: int, end: str, scale: float = 1.0, damp: float = 0.01):
    """CorDA in float64 numpy from the paper's formulas and peft's damping, written apart from corda.py:
    (A (r, m), B (n, r), singular values of W C'); ``end``: "largest" or "smallest" components."""
    W, x = W.double().numpy(), x.double().numpy().reshape(-1, x.shape[-1])
    C = x.T @ x
    C = C / np.mean(np.diag(C))
    Cd = C + damp * np.mean(np.diag(C)) * np.eye(len(C))
    U, S, Vh = np.linalg.svd(W @ Cd, full_matrices=False)
    order = np.argsort(-S)
    idx = order[:rank] if end == "largest" else order[len(S) - rank:]
    root = np.sqrt(S[idx] / scale)
    A = root[:, None] * (Vh[idx] @ np.linalg.inv(Cd))
    return torch.from_numpy(A), torch.from_numpy(U[:, idx] * root), S


def aligned(A, B, B_ref):
    """(A, B) with each component's sign matched to B_ref's (an SVD fixes U_i, V_i only up to a joint sign)."""
    signs = torch.sign((B.double() * B_ref.double()).sum(0))
    return A.double() * signs[:, None], B.double() * signs


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------- the math


def test_covariance_is_the_uncentred_second_moment_at_unit_mean_diagonal():
    x = inputs(300, 16)
    stat = moments_of(x, chunks=7)
    m2 = stat.m2.clone()
    C = corda.covariance(stat)
    ref = x.T @ x
    ref = ref / ref.diagonal().mean()
    # fp32 moments (Chan's merge) against float64 X^T X: ~1e-7 per entry, 1e-5 of the largest leaves room
    torch.testing.assert_close(C.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    assert torch.equal(stat.m2, m2)  # the statistic is read, never changed (initpass.py shares it)
    centred = stat.m2.double() / stat.m2.double().diagonal().mean()
    assert float((centred - ref).abs().max()) > 0.1  # the mean term matters on these inputs


@pytest.mark.parametrize("mode,end", [("ipm", "largest"), ("kpm", "smallest")])
def test_factors_match_a_float64_decomposition(mode, end):
    x, layer, scale = inputs(300, 16, seed=2), linear(10, 16), 0.5
    (A0, B0), stats = INIT[mode](layer, moments_of(x), RANK, scale, 1e-3, torch.Generator())
    A, B, S = reference(layer.weight.detach(), x, RANK, end, scale)
    gaps = np.abs(S[:, None] - S[None, :]) + np.eye(len(S)) * S[0]
    assert gaps.min() / S[0] > 0.01  # distinct singular values: the singular vectors are well defined
    # fp32 SVD of W C': vector errors ~ eps32 ||W C'|| / gap <= 6e-8 / 0.01 = 6e-6 of the factors' size
    A0, B0 = aligned(A0, B0, B)
    assert rel(A0, A) < 1e-4 and rel(B0, B) < 1e-4
    assert rel(scale * B0 @ A0, B @ A * scale) < 1e-4
    assert stats["damp"] == 0.01 and stats["tokens"] == 300
    kept = S[:RANK] if end == "largest" else S[-RANK:]
    assert stats["energy_share"] == pytest.approx(float((kept ** 2).sum() / (S ** 2).sum()), rel=1e-4)
    other = reference(layer.weight.detach(), x, RANK, "smallest" if end == "largest" else "largest", scale)
    assert rel(scale * B0 @ A0, other[1] @ other[0] * scale) > 0.5  # the other end is far: swapping modes fails


def test_the_two_modes_split_w_exactly_even_with_a_singular_covariance():
    """W = U S V^T C'^-1 over all p = min(n, m) components: IPM's top r plus KPM's bottom p - r products give W
    back, whatever C is (C' is invertible by the damping), here with inputs of rank 3 < m = 16."""
    x, layer = inputs(200, 16, seed=3, k=3), linear(10, 16)
    stat, W = moments_of(x), layer.weight.detach().double()
    (A1, B1), s1 = corda_ipm.layer_init(layer, stat, 4, 1.0, 1e-3, torch.Generator())
    (A2, B2), _ = corda_kpm.layer_init(layer, stat, 6, 1.0, 1e-3, torch.Generator())
    assert s1["damp"] == 0.01  # peft's first damping already inverts it in fp32
    # fp32 round trip through C' and C'^-1 (condition ~ 100 m here): 1e-4 of W's largest entry
    assert rel(B1.double() @ A1.double() + B2.double() @ A2.double(), W) < 1e-4
    A, B, _ = reference(layer.weight.detach(), x, 4, "largest")
    assert rel(aligned(A1, B1, B)[0], A) < 1e-3  # conditioning ~1e3 of C': 1e-3


def test_each_mode_takes_its_end_of_the_spectrum_on_a_case_solved_by_hand():
    """W = diag(3, 2, 1, 0.5) and inputs along the axes with energies (0.1, 1, 4, 2): W C' is diagonal, its
    components are the axes ranked by w_i c'_i = (0.20, 1.15, 2.26, 0.57) after normalisation and damping. IPM
    (r = 1) takes axis 2 (the smallest weight but the most used input), KPM axis 0 (the largest weight, rarely
    used); plain PiSSA / MiLoRA would take axes 0 / 3."""
    w, energy = torch.tensor([3.0, 2.0, 1.0, 0.5]), torch.tensor([0.1, 1.0, 4.0, 2.0])
    stat = activations.Moments(10, torch.zeros(4, dtype=torch.float64), torch.diag(energy))
    layer = linear(4, 4, weight=torch.diag(w))
    for mode, axis in (("ipm", 2), ("kpm", 0)):
        (A0, B0), _ = INIT[mode](layer, stat, 1, 1.0, 1e-3, torch.Generator())
        expect = torch.zeros(4, 4)
        expect[axis, axis] = w[axis]
        torch.testing.assert_close(B0 @ A0, expect, atol=1e-6, rtol=0)  # W's own component on that axis


def test_damping_doubles_until_the_fp32_inverse_is_accurate():
    """peft's loop with a tolerance that the first two damping levels miss: the result is the first level
    0.01 * 2^k whose inverse passes peft's own check, torch.dist(C' inv(C'), I) < tol."""
    x = inputs(64, 96, seed=4, k=1)
    C = x.float().T @ x.float()
    C = C / C.diagonal().mean()

    def err(d):
        fixed = C + torch.diag(torch.ones(96) * C.diagonal().mean() * d)
        return float(torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(96))), fixed

    errs = [err(0.01 * 2 ** k)[0] for k in range(6)]
    assert min(errs[:2]) > 1.5 * errs[2]  # room for a tolerance between them
    tol = math.sqrt(min(errs[:2]) * errs[2])
    expect = next(k for k, e in enumerate(errs) if e < tol)
    fixed, inv, damp, e = corda.damped(C, tol)
    assert damp == 0.01 * 2 ** expect and expect >= 2 and e < tol
    torch.testing.assert_close(fixed, err(damp)[1], atol=0, rtol=0)
    with pytest.raises(InitError, match="could not be inverted"):
        corda.damped(torch.full((4, 4), float("nan")))


# ---------------------------------------------------------------- against peft 0.21


def peft_corda():
    """peft 0.21's tuners/lora/corda.py does ``from attr import dataclass`` (attrs, not a dependency here) for
    its three-field CordaEigens: import it with the stdlib dataclass standing in, then take the stand-in away."""
    if "peft.tuners.lora.corda" not in sys.modules:
        stub = "attr" not in sys.modules
        if stub:
            sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
        try:
            importlib.import_module("peft.tuners.lora.corda")
        finally:
            if stub:
                del sys.modules["attr"]
    return sys.modules["peft.tuners.lora.corda"]


class Tiny(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = linear(*weight.shape, weight=weight)

    def forward(self, x):
        return self.proj(x)


def calibration(seed: int, m: int, k: int | None = None) -> list[torch.Tensor]:
    """Four calls of (1, 40, m) rows whose largest entry is 5 in every call: peft's per-call scaling by the
    max is then one factor, 1/25, for all rows, and its C is X^T X / (25 * 4)."""
    x = inputs(160, m, seed=seed, k=k).float()
    x = x * (4.0 / x.abs().max())
    calls = list(x.reshape(4, 1, 40, m))
    for c in calls:
        c[0, 0, 0] = 5.0
    return calls


def peft_factors(W, calls, rank: int, mode: str, alpha: float):
    """peft's CorDA end to end: its hooks collect C, preprocess_corda decomposes, get_peft_model initializes
    lora_A, lora_B and replaces the base weight by the residual. Returns (A, B, residual W, its C, scaling)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    model = Tiny(W)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method=mode, prune_temporary_fields=False))
    peft_corda().preprocess_corda(model, cfg, run_model=lambda: [model(c) for c in calls])
    C = model.proj.covariance_matrix.clone()
    layer = get_peft_model(model, cfg).base_model.model.proj
    return (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
            layer.base_layer.weight.detach(), C, layer.scaling["default"])


@pytest.mark.parametrize("mode,seed,k", [("ipm", 5, None), ("kpm", 6, None), ("ipm", 7, 3), ("kpm", 7, 3)])
def test_same_factors_and_residual_as_peft(mode, seed, k):
    """Given peft's own C, our factors are peft's up to fp32 rounding (we multiply only the kept rows of V^T by
    C'^-1, peft all of them: measured max relative diff 4e-7, 8e-6 with a singular C whose C'^-1 has entries
    ~100; bound 1e-4); peft's new base weight is W - s B0 A0. Through our moments
    of the same rows, C is peft's divided by its mean diagonal tau (k = 3: a singular C), so the product is the
    same and the split moves by one scalar: A0 = A_peft sqrt(tau), B0 = B_peft / sqrt(tau)."""
    W = torch.randn(10, 16, generator=torch.Generator().manual_seed(seed)) / 4.0
    calls = calibration(seed, 16, k)
    A_p, B_p, W_res, C_p, s = peft_factors(W, calls, RANK, mode, alpha=2.0 * RANK)
    assert s == 2.0
    A0, B0, stats = corda.factors(W, C_p, RANK, mode, scale=s)
    assert rel(A0, A_p) < 1e-4 and rel(B0, B_p) < 1e-4 and stats["damp"] == 0.01
    assert rel(W - s * B0 @ A0, W_res) < 1e-4
    stat = moments_of(torch.cat(calls, 1)[0])
    tau = float(C_p.diagonal().mean())
    assert rel(corda.covariance(stat), C_p / tau) < 1e-5
    (A1, B1), _ = INIT[mode](linear(10, 16, weight=W), stat, RANK, s, 1e-3, torch.Generator())
    A1, B1 = aligned(A1, B1, B_p)
    # the same decomposition of a C that differs by fp32 rounding (~1e-7), amplified by C'^-1: its condition is
    # up to ~100 m = 1600 when C is singular (measured 1.1e-4 for k = 3 with KPM, 1e-6 otherwise): bound 1e-3
    assert rel(A1, A_p.double() * math.sqrt(tau)) < 1e-3 and rel(B1, B_p.double() / math.sqrt(tau)) < 1e-3
    assert rel(B1 @ A1, B_p.double() @ A_p.double()) < 1e-3


# ---------------------------------------------------------------- refusals


def test_refusals():
    x, layer = inputs(50, 16), linear(10, 16)
    stat = moments_of(x)
    for bad in (0, 11, True, 2.0):
        with pytest.raises(InitError, match=r"rank must be in \[1, min\(n, m\)\] = \[1, 10\]"):
            corda_ipm.layer_init(layer, stat, bad, 1.0, 1e-3, torch.Generator())
    with pytest.raises(InitError, match="saw no input row"):
        corda_kpm.layer_init(layer, activations.Moments.empty(16), RANK, 1.0, 1e-3, torch.Generator())
    with pytest.raises(InitError, match="zero on every row"):
        corda_kpm.layer_init(layer, moments_of(torch.zeros(8, 16)), RANK, 1.0, 1e-3, torch.Generator())
    with pytest.raises(InitError, match="not finite"):
        corda_ipm.layer_init(layer, moments_of(torch.full((8, 16), float("inf"))), RANK, 1.0, 1e-3, torch.Generator())
    with pytest.raises(InitError, match="weight is zero"):
        corda_ipm.layer_init(linear(10, 16, weight=torch.zeros(10, 16)), stat, RANK, 1.0, 1e-3, torch.Generator())
    with pytest.raises(InitError, match="covariance is"):
        corda_ipm.layer_init(linear(10, 12), stat, RANK, 1.0, 1e-3, torch.Generator())


def test_a_rank_deficient_weight_refuses_dead_components():
    """W of rank 6 (n = 10): W C' has 4 zero singular values. KPM's smallest components are always among them,
    IPM's top r are alive up to r = 6."""
    g = torch.Generator().manual_seed(8)
    layer = linear(10, 16, weight=torch.randn(10, 6, generator=g) @ torch.randn(6, 16, generator=g))
    stat = moments_of(inputs(60, 16))
    (A0, B0), _ = corda_ipm.layer_init(layer, stat, 6, 1.0, 1e-3, torch.Generator())
    assert A0.norm(dim=1).min() > 1e-3 and B0.norm(dim=0).min() > 1e-3
    with pytest.raises(InitError, match=r"only 6 non-zero .* adapter.rank <= 6"):
        corda_ipm.layer_init(layer, stat, 7, 1.0, 1e-3, torch.Generator())
    with pytest.raises(InitError, match=r"only 6 non-zero .* use corda_ipm"):
        corda_kpm.layer_init(layer, stat, 1, 1.0, 1e-3, torch.Generator())


def test_kpm_needs_prior_preservation_in_the_config(tmp_path):
    from fluxlora.config import parse_config

    raw = {"name": "t", "model": {"path": str(tmp_path)}, "data": {"instance_dir": str(tmp_path), "resolution": 32},
           "adapter": {"init": ["lora", "corda_kpm"]}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    for name in ("corda_kpm", "data.class_dir", "data.class_prompt", "data.num_class_images"):
        assert name in str(e.value)
    assert parse_config({**raw, "adapter": {"init": "corda_ipm"}}).adapter.arms == ["corda_ipm"]
    for prior in ({"class_dir": str(tmp_path), "class_prompt": "a dog"},
                  {"num_class_images": 2, "class_prompt": "a dog"}):
        cfg = parse_config({**raw, "data": {**raw["data"], **prior}})
        assert cfg.adapter.arms == ["lora", "corda_kpm"]
    assert methods.get("corda_kpm").needs == methods.PRIOR_ACTIVATIONS
    assert methods.get("corda_ipm").needs == methods.ACTIVATIONS
    assert {methods.get(n).start for n in ("corda_ipm", "corda_kpm")} == {methods.OFFSET}


# ---------------------------------------------------------------- the tiny FLUX


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    """Two flat-coloured class images (prior preservation), unlike the subject's."""
    from PIL import Image

    d = tmp_path_factory.mktemp("class")
    for i, colour in enumerate([(40, 60, 200), (30, 160, 90)]):
        Image.new("RGB", (32, 32), colour).save(d / f"{i:02d}.png")
    return d


def corda_config(tmp_path, tiny_flux, subject_dir, class_dir, **sections):
    sections["data"] = {"instance_dir": str(subject_dir), "resolution": 32, "class_dir": str(class_dir),
                        "class_prompt": "a plain square", **sections.get("data", {})}
    return method_config("corda_ipm", RANK, tmp_path, tiny_flux, subject_dir, **sections)


def test_prior_pass_reads_only_class_rows_and_the_inits_start_at_the_base(tmp_path, tiny_flux, subject_dir,
                                                                          class_dir):
    cfg = corda_config(tmp_path, tiny_flux, subject_dir, class_dir)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    model, t, a = prep.model, cfg.train, cfg.adapter
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    args = (t, targets, a.sb_batches, cfg.data.prior_loss_weight)
    model.train()
    acts, prior = train.activation_pass(prep, *args), corda.prior_activation_pass(prep, *args)
    assert model.training  # eval inside, the mode it found restored
    # NaN instance latents: the prior pass is unchanged (no instance row enters its forward), the training
    # micro-batches' pass turns NaN (so this probe can see an instance row)
    poisoned = dataclasses.replace(prep, instance=dataclasses.replace(prep.instance, groups=[
        dataclasses.replace(g, latents=torch.full_like(g.latents, float("nan"))) for g in prep.instance.groups]))
    again = corda.prior_activation_pass(poisoned, *args)
    assert not torch.isfinite(train.activation_pass(poisoned, *args)[targets[0]].m2).all()
    for name in targets:
        assert acts[name].count == 2 * prior[name].count > 0  # half of each micro-batch: its class rows
        assert torch.equal(again[name].m2, prior[name].m2)
    with pytest.raises(InitError, match="data.class_dir"):
        corda.prior_activation_pass(dataclasses.replace(prep, prior=None), *args)
    assert_init_starts_at_the_base(prep, cfg, "corda_ipm", targets, acts)
    assert methods.PRIOR_ACTIVATIONS in train.stat_passes(prep, t, 1, 1.0), \
        "register corda.prior_activation_pass in train.stat_passes (docs/methods.md section 12)"
    assert_init_starts_at_the_base(prep, cfg, "corda_kpm", targets, prior)


def assert_init_starts_at_the_base(prep, cfg, method: str, targets: list[str], stats: dict) -> None:
    """The trainer's init of ``method`` (initpass.py through train.init_passes): the pair layers hold the
    factors of layer_init on ``stats`` (the pass run by the test), step 0 is the base, the base is untouched."""
    model, t = prep.model, cfg.train
    before, base_out = weights_hash(model), outputs(model)
    fn, a = methods.get(method).layer_init_fn(), cfg.adapter
    scale = adapters.scale_for(a.rank, a.effective_alpha, a.scaling, a.alpha_coefficient)
    expect = {n: fn(model.get_submodule(n), stats[n], RANK, scale, t.lr, None)[0] for n in targets}
    info = adapters.inject(model, method, RANK, scale, targets, seed=t.seed,
                           inputs=adapters.InitInputs(train.init_passes(prep, cfg, method, targets), t.lr))
    assert info.has_offset and weights_hash(model) == before
    # the rank-2r branch [B, -B0] [A; A0] cancels s B0 A0 up to fp32 rounding of its sums
    torch.testing.assert_close(outputs(model), base_out, rtol=0, atol=1e-5)
    for name in targets:
        layer, (A0, B0) = model.get_submodule(name), expect[name]
        torch.testing.assert_close(layer.lora_A["subject"].weight, A0, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B["subject"].weight, B0, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B["offset"].weight, -B0, rtol=1e-5, atol=1e-7)
        assert "damp" in info.layers[name]
    adapters.remove(model, info)
    assert weights_hash(model) == before


def test_a_kpm_run_with_class_images_starts_at_the_base_and_trains(tmp_path, tiny_flux, subject_dir, class_dir):
    from PIL import Image

    cfg = corda_config(tmp_path, tiny_flux, subject_dir, class_dir, name="kpm", adapter={"init": "corda_kpm"},
                       train={"steps": 1}, export={"formats": ["diffusers"]})
    assert [r.get("error") for r in run(cfg, warn=lambda m: None)] == [None]
    base = np.asarray(generate_one(FLUX, FLUX.load(str(tiny_flux)), cfg.sample.prompts[0], 24)).astype(int)
    arm = GroupDir(tmp_path / "runs" / "kpm").arm("corda_kpm")
    first = np.asarray(Image.open(arm.samples_dir / "step-000000" / "00.png")).astype(int)
    last = np.asarray(Image.open(arm.samples_dir / "step-000001" / "00.png")).astype(int)
    assert np.abs(first - base).max() <= 1  # the frozen offset cancels s B0 A0
    assert np.abs(last - first).max() > 0  # and the step trained
    assert "energy_share" in arm.init_file.read_text() and arm.adapter_file.is_file()
