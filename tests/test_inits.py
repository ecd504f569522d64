"""Unit tests for fluxlora.inits: small fp32 matrices, fixed seeds, numpy as the independent reference."""

import math

import numpy as np
import pytest
import torch

from fluxlora import inits
from fluxlora import methods
from fluxlora.inits import INITS, InitError, dst_basis, init_factors

SHAPES = [(48, 40), (40, 64)]  # n > m and n < m


def rand_w(n, m, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g) * std


def decaying_w(n, m, seed=0, decay=0.9):
    """W = U diag(decay^i) V^T with random orthonormal U, V: a spectrum with a gap, like real layers."""
    rng = np.random.default_rng(seed)
    k = min(n, m)
    U, _ = np.linalg.qr(rng.standard_normal((n, k)))
    V, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return torch.from_numpy((U * decay ** np.arange(k)) @ V.T).float()


def best_rank_r(W, r, smallest=False):
    U, S, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
    sl = slice(-r, None) if smallest else slice(0, r)
    return (U[:, sl] * S[sl]) @ Vh[sl], float((S[sl] ** 2).sum() / (S ** 2).sum())


def product(res, scale=1.0):
    return scale * (res.B0.double() @ res.A0.double()).numpy()


# ---------------------------------------------------------------- DST-I basis


def test_dst_basis_rows_are_orthonormal():
    Phi = dst_basis(64, 8)
    assert Phi.shape == (8, 64) and Phi.dtype == torch.float32
    torch.testing.assert_close(Phi @ Phi.T, torch.eye(8), atol=1e-5, rtol=0)


def test_dst_basis_matches_full_symmetric_dst_matrix():
    M = 13
    idx = np.arange(1, M + 1)
    full = math.sqrt(2 / (M + 1)) * np.sin(np.outer(idx, idx) * np.pi / (M + 1))
    np.testing.assert_allclose(dst_basis(M, 5).numpy(), full[:5], atol=1e-6)
    np.testing.assert_allclose(full, full.T)  # symmetric, so Phi_n[:, :r] == dst_basis(n, r).T


def test_dst_basis_full_matrix_squares_to_identity():
    Phi = dst_basis(17, 17)
    torch.testing.assert_close(Phi @ Phi, torch.eye(17), atol=1e-5, rtol=0)


def test_dst_basis_is_accurate_for_large_sizes():
    # The int64 phase reduction keeps the fp32 error at ~3e-7 of the amplitude; a naive fp32 argument
    # (up to k pi = 200 here) gives 9e-6 (measured against this float64 reference).
    M, k = 12288, 64
    i, j = np.arange(1, k + 1)[:, None], np.arange(1, M + 1)[None, :]
    amp = math.sqrt(2 / (M + 1))
    ref = amp * np.sin(i * j * np.pi / (M + 1))
    assert np.abs(dst_basis(M, k).numpy() - ref).max() < 1e-6 * amp


def test_dst_basis_rejects_k_above_size():
    with pytest.raises(InitError, match=r"k must be in \[1, size\] = \[1, 4\] \(got 5\)"):
        dst_basis(4, 5)


# ---------------------------------------------------------------- LoRAM


def test_sum_sq_is_accurate_where_one_fp32_norm_is_not():
    # A single fp32 vector_norm over this 1024x1024 matrix is off by 2e-5 (measured); row norms
    # combined in float64 are off by ~1e-9.
    W = rand_w(1024, 1024, seed=11)
    ref = float((W.double() ** 2).sum())
    assert inits._sum_sq(W) == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("offset", [0.0, 0.02, 1.0])  # zero mean, mean = std, fallback (mean = 50 std)
def test_weight_moments_match_numpy_unbiased_var(offset):
    W = rand_w(48, 40, seed=12) + offset
    var, sumsq = inits.weight_moments(W)
    Wd = W.double().numpy()
    assert var == pytest.approx(np.var(Wd, ddof=1), rel=1e-5)
    assert sumsq == pytest.approx((Wd ** 2).sum(), rel=1e-6)


def test_loram_gain_is_log_r_base_min_dim():
    assert inits.loram_gain(8, 3072, 12288) == pytest.approx(math.log(8) / math.log(3072))
    assert inits.loram_gain(40, 48, 40) == pytest.approx(1.0)


def test_loram_is_deterministic():
    W = rand_w(48, 40)
    a, b = init_factors("loram", W, 4, 1.0), init_factors("loram", W, 4, 1.0)
    assert torch.equal(a.A0, b.A0) and torch.equal(a.B0, b.B0)


@pytest.mark.parametrize("n,m", SHAPES)
def test_loram_product_energy_is_q_times_weight_energy(n, m):
    # docs/methods.md section 1.2 step 5: ||B0 A0||_F^2 = beta^4 r ~ Q ||W||_F^2 for zero-mean W. The reference's
    # var form (mean-subtracted) adds nu[B_hat A_hat] / var[B_hat A_hat] = 1.13 at r=8 (1.18 at r=6,
    # 1.27 at r=4; nearly size-independent, 1.127 at 3072x3072), hence r=8 and 15%.
    W, r = rand_w(n, m, seed=1), 8
    res = init_factors("loram", W, r, 1.0)
    assert res.A0.shape == (r, m) and res.B0.shape == (n, r)
    got = float(torch.linalg.matrix_norm(res.B0 @ res.A0)) ** 2
    want = res.stats["Q"] * float(torch.linalg.matrix_norm(W)) ** 2
    assert got == pytest.approx(want, rel=0.15)


@pytest.mark.parametrize("n,m", SHAPES)
def test_loram_beta_matches_reference_formula_in_numpy(n, m):
    W, r = rand_w(n, m, seed=2) + 0.01, 5  # non-zero mean: exercises the mean-subtracted var
    idx_n, idx_m, k = np.arange(1, n + 1), np.arange(1, m + 1), np.arange(1, r + 1)
    A_hat = math.sqrt(2 / (m + 1)) * np.sin(np.outer(k, idx_m) * np.pi / (m + 1))
    B_hat = (math.sqrt(2 / (n + 1)) * np.sin(np.outer(idx_n, idx_n) * np.pi / (n + 1)))[:, :r]
    Q = math.log(r) / math.log(min(n, m))
    beta = (Q * np.var(W.double().numpy(), ddof=1) / np.var(B_hat @ A_hat, ddof=1)) ** 0.25
    res = init_factors("loram", W, r, 1.0)
    assert res.stats["beta"] == pytest.approx(beta, rel=1e-5)
    np.testing.assert_allclose(res.A0.numpy(), beta * A_hat, atol=1e-6)
    np.testing.assert_allclose(res.B0.numpy(), beta * B_hat, atol=1e-6)


def test_loram_beta_ignores_scale_and_stats_are_present():
    W = rand_w(40, 64, seed=3)
    a, b = init_factors("loram", W, 4, 1.0), init_factors("loram", W, 4, 0.25)
    assert torch.equal(a.A0, b.A0)
    assert set(a.stats) == {"Q", "beta", "init_ratio"}
    prod = float(torch.linalg.matrix_norm(a.B0 @ a.A0) / torch.linalg.matrix_norm(W))
    assert a.stats["init_ratio"] == pytest.approx(prod, rel=1e-4)


def test_loram_refuses_rank_one():
    msg = "rank must be >= 2 for loram (got 1): Q = ln r / ln min(n,m) is 0"
    with pytest.raises(InitError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        init_factors("loram", rand_w(48, 40), 1, 1.0)


def test_loram_refuses_constant_weight():
    with pytest.raises(InitError, match=r"var\(W\) is 0.0"):
        init_factors("loram", torch.full((48, 40), 0.3), 4, 1.0)


# ---------------------------------------------------------------- PiSSA / MiLoRA / OLoRA


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_pissa_gives_best_rank_r_approximation(n, m, scale):
    W, r = rand_w(n, m, seed=4), 6
    res = init_factors("pissa", W, r, scale)
    best, share = best_rank_r(W, r)
    assert res.A0.shape == (r, m) and res.B0.shape == (n, r)
    np.testing.assert_allclose(product(res, scale), best, atol=1e-4)
    assert res.stats["energy_share"] == pytest.approx(share, rel=1e-4)


def test_lowrank_q_oversamples_with_a_floor_of_16():
    assert [inits.lowrank_q(r, 3072, 3072) for r in (1, 8, 16, 64)] == [16, 16, 24, 72]
    assert inits.lowrank_q(8, 3072, 12) == 12  # capped at min(n, m)


@pytest.mark.parametrize("n,m", [(200, 160), (160, 200)])
def test_pissa_fast_is_within_tolerance_of_full_svd(n, m):
    # Tolerance: with q = 16 = r + 10 and niter = 4 the power scheme works on the spectrum to the 9th
    # power, so leakage into the top-r subspace is ~(sigma_17 / sigma_6)^9 = 0.9^99 ~ 3e-5 (Halko et
    # al. 2011, Cor. 10.10) and its effect on the error is second order (measured gap: 1e-10). 1e-3
    # is far above that and fp32 rounding, and far below the 0.04 gap without power iterations
    # (niter=0), so a lost niter, lost oversampling or wrong factor formula fails.
    W, r = decaying_w(n, m, seed=5), 6
    res = init_factors("pissa_fast", W, r, 0.5, generator=torch.Generator().manual_seed(0))
    Wn = W.double().numpy()
    best, share = best_rank_r(W, r)
    err_fast = np.linalg.norm(Wn - product(res, 0.5)) / np.linalg.norm(Wn)
    err_best = np.linalg.norm(Wn - best) / np.linalg.norm(Wn)
    assert err_fast - err_best < 1e-3
    assert res.stats["energy_share"] == pytest.approx(share, rel=1e-3)


def test_pissa_fast_generator_is_deterministic_and_leaves_global_rng_alone():
    W = decaying_w(60, 50, seed=6)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = init_factors("pissa_fast", W, 4, 1.0, generator=torch.Generator().manual_seed(7))
    b = init_factors("pissa_fast", W, 4, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.A0, b.A0) and torch.equal(a.B0, b.B0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("n,m", SHAPES)
def test_milora_uses_the_smallest_components(n, m):
    W, r = rand_w(n, m, seed=8), 5
    res = init_factors("milora", W, r, 1.0)
    minor, share = best_rank_r(W, r, smallest=True)
    np.testing.assert_allclose(product(res), minor, atol=1e-4)
    assert res.stats["energy_share"] == pytest.approx(share, rel=1e-3)


@pytest.mark.parametrize("n,m", SHAPES)
def test_olora_matches_numpy_qr_up_to_signs(n, m):
    # Q D D R = Q R for any diagonal sign matrix D: the product is sign-convention free.
    W, r = rand_w(n, m, seed=9), 5
    Q, R = np.linalg.qr(W.double().numpy())
    res = init_factors("olora", W, r, 2.0)
    assert res.A0.shape == (r, m) and res.B0.shape == (n, r)
    np.testing.assert_allclose(product(res), Q[:, :r] @ R[:r], atol=1e-5)
    ratio = 2.0 * np.linalg.norm(Q[:, :r] @ R[:r]) / np.linalg.norm(W.double().numpy())
    assert res.stats["init_ratio"] == pytest.approx(ratio, rel=1e-4)


# ---------------------------------------------------------------- plain LoRA


def test_lora_is_kaiming_uniform_with_zero_b():
    W = rand_w(48, 40)
    a = init_factors("lora", W, 4, 1.0, generator=torch.Generator().manual_seed(1))
    b = init_factors("lora", W, 4, 1.0, generator=torch.Generator().manual_seed(1))
    assert a.A0.shape == (4, 40) and torch.equal(a.A0, b.A0)
    assert a.B0.shape == (48, 4) and not a.B0.any()
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt 5): gain sqrt(1/3), bound sqrt(3) gain / sqrt(m)
    assert a.A0.abs().max() <= bound and a.A0.abs().max() > 0.8 * bound


def test_lora_gaussian_std_is_one_over_rank():
    W = torch.zeros(8, 4096)
    res = init_factors("lora_gaussian", W, 4, 1.0, generator=torch.Generator().manual_seed(2))
    assert float(res.A0.std()) == pytest.approx(1 / 4, rel=0.03)
    assert not res.B0.any()
    zero_from_weights = {m.name for m in methods.METHODS.values()
                         if m.start == methods.ZERO and m.needs == methods.WEIGHTS}
    assert zero_from_weights == {"lora", "lora_gaussian"}  # (eva's B0 is zero too; its A0 reads activations)


# ---------------------------------------------------------------- errors and registry


def test_registry_has_exactly_the_documented_methods():
    assert set(INITS) == {"lora", "lora_gaussian", "pissa", "pissa_fast", "loram", "olora", "milora"}


def test_unknown_method_lists_valid_names():
    with pytest.raises(InitError, match="unknown init method 'pisa'.*lora, lora_gaussian, loram, milora"):
        init_factors("pisa", rand_w(8, 8), 2, 1.0)


@pytest.mark.parametrize("method", sorted(INITS))
@pytest.mark.parametrize("rank", [0, 41])
def test_every_method_refuses_rank_outside_one_to_min_dim(method, rank):
    with pytest.raises(InitError, match=rf"rank must be in \[1, min\(n, m\)\] = \[1, 40\] for {method} "
                                        rf"on a layer of shape \(n=48, m=40\) \(got {rank}\)"):
        init_factors(method, rand_w(48, 40), rank, 1.0)


@pytest.mark.parametrize("method", sorted(INITS))
def test_every_method_returns_fp32_factors_of_peft_shapes(method):
    W = rand_w(40, 64, seed=10)
    res = init_factors(method, W, 4, 1.0, generator=torch.Generator().manual_seed(0))
    assert res.A0.shape == (4, 64) and res.B0.shape == (40, 4)
    assert res.A0.dtype == res.B0.dtype == torch.float32
    assert all(isinstance(v, float) for v in res.stats.values())


def test_non_fp32_weight_and_bad_scale_are_refused():
    with pytest.raises(InitError, match=r"W must be float32 \(got torch.bfloat16\)"):
        init_factors("pissa", rand_w(8, 8).bfloat16(), 2, 1.0)
    with pytest.raises(InitError, match=r"scale must be a finite number > 0 for pissa \(got 0.0\)"):
        init_factors("pissa", rand_w(8, 8), 2, 0.0)
