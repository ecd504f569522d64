"""CorDA, context-oriented decomposition adaptation (Yang et al., arXiv 2406.05223; docs/methods.md section 12):
the weight is decomposed in the metric of the layer's input covariance, so the adapter starts on the
components that matter most (IPM) or least (KPM) for the data the covariance was taken on.

  1. C = X^T X, the uncentred second moment of the layer's input rows over a calibration pass (the moments
     of activations.py: X^T X = M2 + N mu mu^T), scaled to unit mean diagonal (section 12, "Scale of C": only
     the balance between A0 and B0 depends on C's overall scale, and peft's per-call max scaling needs
     per-call statistics the moments do not keep);
  2. peft's damping: C' = C + d mean(diag C) I with d = 0.01, doubled until ||C' C'^-1 - I||_F < 0.05;
  3. SVD  W C' = U S V^T, so W = U S (V^T C'^-1) exactly;
  4. IPM (``corda_ipm``, calibrated on the training micro-batches) keeps the r LARGEST components, KPM
     (``corda_kpm``, calibrated on the prior-preservation images) the r SMALLEST: A0 = sqrt(S_r / s) V_r^T C'^-1,
     B0 = U_r sqrt(S_r / s) (peft's and the authors' "UV" split), s B0 A0 = U_r S_r V_r^T C'^-1; s: the arm's
     adapter scale, as peft (section 12, "Split of S");
  5. peft then replaces W by W - s B0 A0; here W is never written: the frozen offset (A0, -B0) cancels the
     product (docs/methods.md section 6), so step 0 is the base.

``prior_activation_pass`` is KPM's pass: the activation pass over the prior rows of the training micro-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxlora import adapters
from fluxlora.activations import Moments
from fluxlora.errors import InitError

DAMP = 0.01  # peft's (and the authors') first damping factor, relative to the mean diagonal of C
INV_TOL = 0.05  # their bound on ||C' C'^-1 - I||_F
MAX_DOUBLINGS = 60  # 0.01 * 2^60: C' ~ d I, inverted exactly long before; only guards non-finite input
METHODS = {"ipm": "corda_ipm", "kpm": "corda_kpm"}  # mode -> its method name, for messages


@torch.no_grad()
def covariance(stat: Moments, device=None, name: str = "corda") -> Tensor:
    """X^T X = M2 + N mu mu^T of the layer's input rows, divided by its mean diagonal (fp32, m x m, a new
    tensor on ``device``: ``stat`` is not changed)."""
    if stat.count < 1:
        raise InitError(f"{name}: the calibration pass saw no input row of this layer -> fix: check that the "
                        "layer runs in the denoiser's forward, or leave it out of the targets")
    C = stat.m2.to(device=device, dtype=torch.float32, copy=True)
    mu = stat.mean.to(device=C.device, dtype=torch.float32)
    C.addr_(mu, mu, alpha=float(stat.count))
    level = float(C.diagonal().sum(dtype=torch.float64)) / C.shape[0]
    if not torch.isfinite(C).all():
        raise InitError(f"{name}: this layer's inputs in the calibration pass are not finite (inf / nan) -> fix: "
                        "find what overflows in the base's forward (try train.mixed_precision=no)")
    if level <= 0.0:
        raise InitError(f"{name}: this layer's inputs are zero on every row of the calibration pass, so they "
                        "define no covariance -> fix: leave the layer out of the targets or use another init")
    return C.div_(level)


@torch.no_grad()
def damped(C: Tensor, tol: float = INV_TOL, name: str = "corda") -> tuple[Tensor, Tensor, float, float]:
    """peft's (and the authors') rule: (C', C'^-1, d, error) with C' = C + d mean(diag C) I, d = 0.01 doubled
    until the fp32 inverse satisfies ||C' C'^-1 - I||_F < tol. C is PSD with a positive diagonal, so C' is
    positive definite for every d > 0; the doubling only fights rounding in an ill-conditioned C."""
    level, damp = C.diagonal().mean(), DAMP
    for _ in range(MAX_DOUBLINGS):
        fixed = C.clone()
        fixed.diagonal().add_(level * damp)
        try:
            inv = torch.linalg.inv(fixed)
            P = fixed @ inv
            P.diagonal().sub_(1.0)
            err = float(torch.linalg.matrix_norm(P))
        except RuntimeError:  # torch.linalg.LinAlgError: singular to working precision
            err = float("inf")
        if err < tol:
            return fixed, inv, damp, err
        damp *= 2.0
    raise InitError(f"{name}: the damped input covariance could not be inverted (||C' C'^-1 - I||_F >= {tol} up to "
                    f"damping {damp:g}) -> fix: leave the layer out of the targets or use another init")


def _check(W: Tensor, C: Tensor, rank: int, name: str) -> None:
    n, m = W.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, m):
        raise InitError(f"rank must be in [1, min(n, m)] = [1, {min(n, m)}] for {name} on a layer of shape (n={n}, "
                        f"m={m}) (got {rank!r}) -> fix: use adapter.rank <= {min(n, m)} or leave this layer out of "
                        "the targets")
    if tuple(C.shape) != (m, m):
        raise InitError(f"{name}: the input covariance is {tuple(C.shape)}, the layer takes m = {m} inputs")
    if not torch.isfinite(W).all() or not W.any():
        raise InitError(f"{name}: this layer's weight is " + ("not finite" if W.any() else "zero") +
                        ", so it has no components to start from -> fix: leave the layer out of the targets")


def _take(S: Tensor, rank: int, mode: str, name: str) -> slice:
    """The components the mode keeps (S descending): IPM the first r, KPM the last r. Refuses numerically
    zero ones (numpy's matrix_rank tolerance): their A0 row and B0 column would be zero, a dead component."""
    p = S.shape[0]
    keep = slice(0, rank) if mode == "ipm" else slice(p - rank, p)
    alive = int((S > S[0] * p * torch.finfo(torch.float32).eps).sum())
    if alive < keep.stop:  # KPM's last r include every zero one, whatever r is
        fix = (f"use adapter.rank <= {alive}" if mode == "ipm" else
               f"use {METHODS['ipm']}, or leave this layer out of the targets")
        raise InitError(f"{name}: W C' has only {alive} non-zero singular values of {p}, and the mode takes "
                        f"components {keep.start + 1}..{keep.stop}: the zero ones would start with zero A0 rows and "
                        f"B0 columns and never train -> fix: {fix}")
    return keep


@torch.no_grad()
def factors(W: Tensor, C: Tensor, rank: int, mode: str, scale: float = 1.0,
            tol: float = INV_TOL) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(A0 (r, m), B0 (n, r), stats), fp32 on W's device, from the weight W (n, m) and the input covariance C
    (m, m), any overall scale (docs/methods.md section 12 steps 3-5). ``scale``: peft divides S by the LoRA
    scale s so that s B0 A0 is W's component whatever s is; 1 (the default) is the authors' code."""
    if mode not in METHODS:
        raise ValueError(f"CorDA mode must be one of {sorted(METHODS)} (got {mode!r})")
    name = METHODS[mode]
    W = W.float()
    _check(W, C, rank, name)
    fixed, inv, damp, err = damped(C.to(W.device, torch.float32), tol, name)
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    keep = _take(S, rank, mode, name)
    root = torch.sqrt(S[keep] / scale)
    A0 = root[:, None] * (Vh[keep] @ inv)
    B0 = U[:, keep] * root[None, :]
    part = (B0 @ A0).square().sum() * scale ** 2  # ||s B0 A0||_F^2: W's component the adapter starts on
    stats = {"damp": damp, "inv_error": err, "sigma_1": float(S[0]), "sigma_kept_min": float(S[keep][-1]),
             "energy_share": float(S[keep].square().sum() / S.square().sum()),
             "init_ratio": float((part / W.square().sum()).sqrt())}
    return A0.contiguous(), B0.contiguous(), stats


def layer_init(mode: str, layer: nn.Module, stat: Moments, rank: int, *, scale: float = 1.0):
    """One layer's CorDA init in ``mode`` (initpass.py's per-layer step, via corda_ipm / corda_kpm):
    ((A0, B0), stats) from the pristine layer's fp32 weight (dequantized if int8 / nf4) and the moments of its
    inputs. Deterministic: no generator is read."""
    W = adapters.float_weight(layer)
    C = covariance(stat, W.device, METHODS.get(mode, "corda"))
    A0, B0, stats = factors(W, C, rank, mode, scale)
    stats["tokens"] = stat.count
    return (A0, B0), stats


def prior_rows(batch):
    """The prior-preservation rows of a training micro-batch (train.Batch laid out [instance | prior]), as a
    batch of their own (n_instance = 0: every row is a prior row)."""
    from fluxlora.train import Batch

    n = batch.n_instance
    weights = batch.weights[n:] if batch.weights is not None else None
    return Batch(batch.x0[n:], batch.cond.select(slice(n, None)), batch.latent_hw, 0, weights)


def prior_activation_pass(prep, t, targets: list[str], batches: int, prior_weight: float) -> dict[str, Moments]:
    """KPM's calibration pass (methods.py PRIOR_ACTIVATIONS; docs/methods.md section 12 step 1): the activation
    pass (train.activation_pass: forward only, eval mode, its generator seeding, data-parallel merge) over the
    prior-preservation rows of the first ``batches`` training micro-batches; the instance rows never enter
    the forward."""
    from fluxlora import train

    if prep.prior is None:
        raise InitError(f"{METHODS['kpm']} calibrates on the prior-preservation (class) images and this run has "
                        "none -> fix: set data.class_dir and data.class_prompt, or data.num_class_images and "
                        "data.class_prompt")
    return train.activation_pass(prep, t, targets, batches, prior_weight, rows=prior_rows)
