"""LoRA initializations: each method maps one layer's weight to the initial factors (A0, B0).

The trainer never mutates base weights. An adapted layer computes
    y = W x + s * (B A - B0 A0) x
with (A0, B0) kept as a frozen second low-rank path and training starting from A = A0, B = B0,
so the step-0 output equals the base output for every method. Shapes follow peft
(docs/methods.md section 0): layer nn.Linear(in=m, out=n), W is (n, m), A0 is (r, m),
B0 is (n, r), s is the adapter scale (alpha / r, alpha / sqrt(r), ...).

Every method has the signature
    fn(W, rank, scale, *, generator=None, niter=4) -> InitResult
W is an fp32 (n, m) tensor (the caller dequantizes / casts); all work happens in fp32 on W's device,
one layer at a time. Use `init_factors(name, ...)` or the `INITS` registry.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxlora.errors import InitError

# Randomized-SVD oversampling for pissa_fast: q = max(rank + 8, 16), capped at min(n, m).
# p = 8 extra columns is inside Halko et al. 2011's recommended p = 5..10 (section 4.2). The floor
# of 16 is a CPU speed rule, measured on this machine (torch 2.13, MKL, 1 thread, niter=4):
#   3072x3072:  q=8 0.38 s, q=11 1.05 s, q=12 0.14 s, q=16 0.09 s, q=24 0.13 s, q=32 0.16 s
#   3072x12288: q=8 1.70 s, q=11 5.70 s, q=12 0.50 s, q=16 0.39 s, q=24 0.56 s, q=32 0.58 s
# The cause is MKL's sgemm for a transposed operand times a narrow (< 12 column) matrix:
# W^T @ Q (3072x3072 by 3072xq) takes 82 ms at q=8 and 203 ms at q=10 but 10 ms at q=16.
# svd_lowrank does 2*niter of those products, so q=16 beats q=8 (docs/design.md environment fact E3).
_OVERSAMPLE = 8
_MIN_Q = 16


@dataclass
class InitResult:
    A0: Tensor  # (r, m) fp32, on W's device
    B0: Tensor  # (n, r) fp32, on W's device
    stats: dict[str, float]  # per-method diagnostics (energy_share, init_ratio, Q, beta, ...)


# ---------------------------------------------------------------- shared checks and helpers


def _check(method: str, W: Tensor, rank: int, scale: float) -> None:
    """Validate the arguments every method shares; raise InitError naming the value and the fix."""
    if not isinstance(W, Tensor) or W.ndim != 2:
        shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise InitError(f"{method}: W must be a 2-D (out, in) weight (got {shape}) -> fix: pass the "
                        "nn.Linear weight of one layer")
    if W.dtype != torch.float32:
        raise InitError(f"{method}: W must be float32 (got {W.dtype}) -> fix: dequantize / cast with "
                        "W.float() before calling the init")
    n, m = W.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, m):
        raise InitError(f"rank must be in [1, min(n, m)] = [1, {min(n, m)}] for {method} on a layer of "
                        f"shape (n={n}, m={m}) (got {rank!r}) -> fix: use adapter.rank <= {min(n, m)} "
                        "or leave this layer out of the targets")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0):
        raise InitError(f"scale must be a finite number > 0 for {method} (got {scale!r}) -> fix: check "
                        "adapter.alpha (s = alpha / r, or alpha / sqrt(r) with rslora)")


def _sum_sq(W: Tensor) -> float:
    """||W||_F^2, accurately: per-row fp32 norms, then a float64 sum of the n row values. A single
    fp32 vector_norm over all of a 3072x3072 weight is off by 5e-4 relative (measured, CPU torch
    2.13); this is off by ~1e-9 and as fast (one pass, no copy of W)."""
    return float(torch.linalg.vector_norm(W, dim=1).to("cpu", torch.float64).square().sum())


def _frob_sq(method: str, W: Tensor) -> float:
    """||W||_F^2 as a Python float; an all-zero W has no spectrum to take factors from."""
    total = _sum_sq(W)
    if total == 0.0:
        raise InitError(f"{method}: W is all zeros, so the factors derived from it carry nothing -> fix: "
                        "use init 'lora' for this layer or leave it out of the targets")
    return total


def _product_fro(B: Tensor, A: Tensor) -> float:
    """||B A||_F without the n x m product: ||BA||_F^2 = tr((B^T B)(A A^T)), two r x r Grams."""
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def _zero_like_b(W: Tensor, rank: int) -> Tensor:
    return torch.zeros(W.shape[0], rank, dtype=torch.float32, device=W.device)


def _spectral(W: Tensor, U_r: Tensor, S_r: Tensor, Vh_r: Tensor, scale: float, total: float) -> InitResult:
    """peft's pissa_init factor formula (docs/methods.md section 2.1 step 3): S_r / s, then split sqrt(S_r / s)
    evenly, A0 = diag(sqrt(S_r/s)) Vh_r, B0 = U_r diag(sqrt(S_r/s)), so s B0 A0 = U_r diag(S_r) Vh_r."""
    root = torch.sqrt(S_r / scale)
    A0 = root[:, None] * Vh_r  # (r, m), a new tensor: the full Vh can be freed
    B0 = U_r * root[None, :]  # (n, r)
    kept = float(S_r.square().sum())
    # U_r, Vh_r have orthonormal columns / rows, so ||s B0 A0||_F^2 = sum(S_r^2).
    stats = {"energy_share": kept / total, "init_ratio": math.sqrt(kept / total)}
    return InitResult(A0=A0, B0=B0, stats=stats)


# ---------------------------------------------------------------- zero-product inits (B0 = 0)


def _factor_a(W: Tensor, rank: int, generator: torch.Generator | None) -> Tensor:
    """Empty (r, m) fp32 tensor on the generator's device (a seed means the same numbers on every
    device, as flux's get_noise does), or on W's device when drawing from the global RNG."""
    device = generator.device if generator is not None else W.device
    return torch.empty(rank, W.shape[1], dtype=torch.float32, device=device)


def lora(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
         niter: int = 4) -> InitResult:
    """peft's default (init_lora_weights=True): A0 Kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(m), 1/sqrt(m)) on the (r, m) tensor; B0 = 0 (peft LoraLayer.reset_lora_parameters)."""
    _check("lora", W, rank, scale)
    A0 = _factor_a(W, rank, generator)
    torch.nn.init.kaiming_uniform_(A0, a=math.sqrt(5), generator=generator)
    return InitResult(A0=A0.to(W.device), B0=_zero_like_b(W, rank), stats={"init_ratio": 0.0})


def lora_gaussian(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
                  niter: int = 4) -> InitResult:
    """peft's init_lora_weights="gaussian" (diffusers' FLUX script): A0 ~ N(0, std = 1/r), B0 = 0."""
    _check("lora_gaussian", W, rank, scale)
    A0 = _factor_a(W, rank, generator)
    torch.nn.init.normal_(A0, mean=0.0, std=1.0 / rank, generator=generator)
    return InitResult(A0=A0.to(W.device), B0=_zero_like_b(W, rank), stats={"init_ratio": 0.0})


# ---------------------------------------------------------------- SVD / QR based inits


def pissa(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
          niter: int = 4) -> InitResult:
    """PiSSA (arXiv 2404.02948) as peft's init_lora_weights="pissa": full SVD, top-r components."""
    _check("pissa", W, rank, scale)
    total = _frob_sq("pissa", W)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return _spectral(W, U[:, :rank], S[:rank], Vh[:rank], scale, total)


def milora(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
           niter: int = 4) -> InitResult:
    """MiLoRA (arXiv 2406.09044): PiSSA's formula on the r SMALLEST singular components."""
    _check("milora", W, rank, scale)
    total = _frob_sq("milora", W)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # S descending: the minor ones are last
    return _spectral(W, U[:, -rank:], S[-rank:], Vh[-rank:], scale, total)


def lowrank_q(rank: int, n: int, m: int) -> int:
    """Columns sampled by pissa_fast's randomized SVD: rank + 8, at least 16 (see _OVERSAMPLE)."""
    return min(max(rank + _OVERSAMPLE, _MIN_Q), n, m)


def _rng_fork(device: torch.device):
    """fork_rng over every device of W's type, so seeding inside it leaves all global RNGs as they were."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    count = torch.get_device_module(device.type).device_count()
    return torch.random.fork_rng(devices=list(range(count)), device_type=device.type)


def _svd_lowrank(M: Tensor, q: int, niter: int, generator: torch.Generator | None):
    """torch.svd_lowrank (Halko et al. 2011, Alg. 5.1) draws its test matrix from the global RNG;
    with a generator, seed a forked global RNG from it: deterministic, global state untouched."""
    if generator is None:
        return torch.svd_lowrank(M, q=q, niter=niter)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with _rng_fork(M.device):
        torch.manual_seed(seed)
        return torch.svd_lowrank(M, q=q, niter=niter)


def pissa_fast(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
               niter: int = 4) -> InitResult:
    """PiSSA with a randomized SVD (peft's "pissa_niter_K", but oversampled: q = lowrank_q(r, n, m))."""
    _check("pissa_fast", W, rank, scale)
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise InitError(f"niter must be an integer >= 0 for pissa_fast (got {niter!r}) -> fix: use 4 "
                        "(peft's pissa_niter_4)")
    total = _frob_sq("pissa_fast", W)
    n, m = W.shape
    # Decompose the tall orientation (docs/design.md environment fact E3: wide ~3x slower). torch 2.13's svd_lowrank already
    # transposes wide inputs itself (measured: equal times), so this view only pins it across versions.
    wide = n < m
    U, S, V = _svd_lowrank(W.T if wide else W, lowrank_q(rank, n, m), niter, generator)
    if wide:  # W.T = U S V^T  =>  W = V S U^T
        U, V = V, U
    return _spectral(W, U[:, :rank], S[:rank], V[:, :rank].T, scale, total)


def olora(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
          niter: int = 4) -> InitResult:
    """OLoRA (arXiv 2406.01775) as peft's init_lora_weights="olora": Q, R = qr(W), B0 = Q[:, :r],
    A0 = R[:r, :], no division by s (docs/methods.md section 5.3)."""
    _check("olora", W, rank, scale)
    total = _frob_sq("olora", W)
    Q, R = torch.linalg.qr(W)
    B0, A0 = Q[:, :rank].clone(), R[:rank].clone()  # clone: a slice would keep all of Q / R alive
    del Q, R
    return InitResult(A0=A0, B0=B0, stats={"init_ratio": scale * _product_fro(B0, A0) / math.sqrt(total)})


# ---------------------------------------------------------------- LoRAM (arXiv 2507.06558)


@functools.lru_cache(maxsize=16)
def dst_basis(size: int, k: int, device: torch.device | str | None = None) -> Tensor:
    """First k DST-I basis vectors of length `size`, as the rows of a (k, size) fp32 tensor:
    Phi_M[i, j] = sqrt(2/(M+1)) sin((i+1)(j+1) pi / (M+1))  [LoRAM Eq. (12), sqrt per docs/methods.md section 1.2 step 1].
    Phi_M is symmetric and orthogonal, so rows and columns are the same vectors; only k rows are built.
    The bases depend only on (size, k): built once per shape and shared (callers never write into them;
    a run's 190 FLUX attention layers build one)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InitError(f"dst_basis size must be an integer >= 1 (got {size!r}) -> fix: pass a layer dim")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise InitError(f"dst_basis k must be in [1, size] = [1, {size}] (got {k!r}) -> fix: ask for at "
                        "most `size` vectors")
    i = torch.arange(1, k + 1, dtype=torch.int64, device=device)
    j = torch.arange(1, size + 1, dtype=torch.int64, device=device)
    # sin has period 2(M+1) in the integer phase (i+1)(j+1): reduce it exactly in int64 first, so the
    # fp32 argument stays in [0, 2 pi) instead of losing digits at (i+1)(j+1) ~ k * M.
    phase = torch.outer(i, j) % (2 * (size + 1))
    return math.sqrt(2.0 / (size + 1)) * torch.sin(phase.to(torch.float32) * (math.pi / (size + 1)))


def _product_var(B: Tensor, A: Tensor) -> float:
    """Unbiased torch.var of all n*m entries of B A without building it (docs/methods.md section 1.6):
    sum of squares = tr((B^T B)(A A^T)), sum = (1^T B)(A 1), var = (sumsq - N mean^2) / (N - 1)."""
    N = B.shape[0] * A.shape[1]
    sumsq = float(((B.T @ B) * (A @ A.T)).sum())
    mean = float((B.sum(dim=0) * A.sum(dim=1)).sum()) / N
    return (sumsq - N * mean * mean) / (N - 1)


def weight_moments(W: Tensor) -> tuple[float, float]:
    """(unbiased var over all entries, ||W||_F^2) of W; the var is the reference code's torch.var(W).
    From two one-pass reductions (row sums and row norms combined in float64, ~1e-9 relative):
    var = (sumsq - N mean^2) / (N - 1). Why not torch.var: on CPU (1 thread, 3072x3072) it takes
    9.4 ms vs 2.2 ms here, and it dominated LoRAM's time. The one-pass form loses digits only when
    mean^2 >> var; weights are near zero-mean, and above mean^2 > 100 var we use torch.var."""
    N = W.numel()
    sumsq = _sum_sq(W)
    mean = float(W.sum(dim=1).to("cpu", torch.float64).sum()) / N
    var = (sumsq - N * mean * mean) / (N - 1)
    if mean * mean > 100.0 * max(var, 0.0):
        var = float(torch.var(W))
    return var, sumsq


def loram_gain(rank: int, n: int, m: int) -> float:
    """Logarithmic spectral gain Q[r] = ln r / ln min(n, m)  [LoRAM Alg. 1; ref code math.log(r, min)]."""
    return math.log(rank) / math.log(min(n, m))


def loram(W: Tensor, rank: int, scale: float, *, generator: torch.Generator | None = None,
          niter: int = 4) -> InitResult:
    """LoRAM (docs/methods.md section 1.2, authors' layer.py): A0 = beta Phi_m[:r, :], B0 = beta Phi_n[:, :r] with
    beta = (Q var(W) / var(B_hat A_hat))^(1/4), var unbiased over all entries as the reference's
    torch.var (computed by weight_moments / _product_var); beta ignores s."""
    _check("loram", W, rank, scale)
    if rank < 2:
        raise InitError(f"rank must be >= 2 for loram (got {rank}): Q = ln r / ln min(n,m) is 0, so both "
                        "factors would be zero (a dead adapter) -> fix: use adapter.rank >= 2")
    n, m = W.shape
    var_w, w_sq = weight_moments(W)
    if not var_w > 0.0:
        raise InitError(f"loram: var(W) is {var_w} for this layer of shape (n={n}, m={m}), so beta = 0 and "
                        "the adapter would be dead -> fix: use init 'lora' for it or leave it out of the targets")
    A_hat = dst_basis(m, rank, W.device)  # (r, m): rows = first r DST-I vectors of length m
    # (n, r): Phi_n is symmetric, so Phi_n[:, :r] = (its first r rows)^T; square layers reuse A_hat.
    B_hat = (A_hat if n == m else dst_basis(n, rank, W.device)).T.contiguous()
    Q = loram_gain(rank, n, m)
    beta = (Q * var_w / _product_var(B_hat, A_hat)) ** 0.25  # LoRAM Eq. (11), the code's var form
    A0, B0 = beta * A_hat, beta * B_hat
    return InitResult(A0=A0, B0=B0, stats={"Q": Q, "beta": beta,
                                           "init_ratio": _product_fro(B0, A0) / math.sqrt(w_sq)})


# ---------------------------------------------------------------- registry


INITS = {
    "lora": lora,
    "lora_gaussian": lora_gaussian,
    "pissa": pissa,
    "pissa_fast": pissa_fast,
    "loram": loram,
    "olora": olora,
    "milora": milora,
}

def init_factors(method: str, W: Tensor, rank: int, scale: float, **kw) -> InitResult:
    """Dispatch to INITS[method]; kw are generator= and niter=."""
    fn = INITS.get(method) if isinstance(method, str) else None
    if fn is None:
        raise InitError(f"unknown init method {method!r} -> fix: use one of {', '.join(sorted(INITS))}")
    return fn(W, rank, scale, **kw)
