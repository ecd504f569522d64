"""LoRA-SB (Singhal et al., arXiv 2411.19557; docs/methods.md section 3): a LoRA-XS layer
    y = W x + s B R A x,    B (n, r) and A (r, m) frozen with orthonormal columns / rows,
                            R (r, r) the only trainable tensor, s = 1,
initialized from the approximated first full-fine-tuning AdamW step (docs/methods.md section 3.2):
  1. G = sum over adapter.sb_batches micro-batches of dL/dW for every target weight W (the trainer's loss);
  2. dW1 = -eta1 sign(G): Adam's bias-corrected first step eta g / (|g| + eps) ~ eta sign(g) (paper Eq. (6)),
     eta1 = the LR of the first non-zero update (peak LR / warm-up steps, docs/methods.md section 7 item 5);
  3. truncated SVD dW1 ~ U_r S_r V_r^T;  4. B = U_r, A = V_r^T, R = diag(S_r), so s B R A = trunc_r(dW1)
     (Eckart-Young optimal; paper section 3.6, docs/methods.md section 3.2 step 4).
W is not offset (docs/methods.md section 3.2 step 5): the step-0 model is W + trunc_r(dW1), by design, and the
whole delta B R A exports as a plain rank-r LoRA (A, B R) on the pristine base (docs/methods.md section 3.3). Base
weights are never touched: the layer is wrapped, not rewritten (docs/design.md decision 1).

peft's LoRA layer has no r x r core, so a target nn.Linear (or bitsandbytes Linear8bitLt / Linear4bit)
is wrapped in `SBLinear`, whose parameter names follow peft's (``base_layer``, ``lora_A.subject``,
``lora_B.subject``, plus ``lora_R.subject``): checkpoints, resume and weight hashes treat it like any
adapted layer, and `detach` puts the original module back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlora import inits
from fluxlora.errors import AdapterError
from fluxlora.layers import SUBJECT, Factor, unwrap, wrap

METHOD = "lora_sb"
NAME = SUBJECT  # the adapter key of the trained factors
SCALE = 1.0  # s = 1: the paper's "hyperparameter independence" (Thm. 5); the code sets lora_alpha = r
SVD_NITER = 10  # subspace iterations of the randomized SVD, as the reference code's svd_lowrank(niter=10)


class SBLinear(nn.Module):
    """A target linear layer with the LoRA-SB path: base_layer(x) + s * B R A dropout(x)."""

    def __init__(self, base: nn.Module, rank: int, dropout: float):
        super().__init__()
        n, m, device = base.out_features, base.in_features, base.weight.device
        self.base_layer = base
        self.lora_A = nn.ModuleDict({NAME: Factor(rank, m, device)})  # (r, m)
        self.lora_R = nn.ModuleDict({NAME: Factor(rank, rank, device)})  # (r, r)
        self.lora_B = nn.ModuleDict({NAME: Factor(n, rank, device)})  # (n, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = SCALE

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        a, r, b = (f[NAME].weight for f in (self.lora_A, self.lora_R, self.lora_B))
        h = self.dropout(x.to(a.dtype))
        delta = F.linear(F.linear(F.linear(h, a), r), b)  # x A^T R^T B^T = (B R A x)^T, never n x m
        return result + (self.scaling * delta).to(result.dtype)


def attach(model: nn.Module, targets: list[str], rank: int, dropout: float) -> None:
    """Wrap every target layer in an SBLinear (all factors zero: the output is the base output)."""
    wrap(model, targets, lambda base: SBLinear(base, rank, dropout))


def detach(model: nn.Module, targets: list[str]) -> None:
    """Put the original layers back (the pristine base for the next arm)."""
    unwrap(model, targets, SBLinear)


def set_trainable(model: nn.Module) -> None:
    """Only R trains; A, B and the base stay frozen."""
    for n, p in model.named_parameters():
        p.requires_grad_(f".lora_R.{NAME}." in n)


class CoreLayers:
    """Layer kind CORE of the method table (methods.py): SBLinear layers, exported as (A, B R)."""

    @staticmethod
    def attach(model: nn.Module, targets: list[str], rank: int, scale: float, dropout: float, offset: bool) -> None:
        attach(model, targets, rank, dropout)  # s = SCALE always; a core layer has no offset

    detach = staticmethod(detach)
    set_trainable = staticmethod(set_trainable)

    @staticmethod
    def export(layer: "SBLinear", has_offset: bool) -> tuple[Tensor, Tensor]:
        return export_factors(layer)


def check_data(images: int, batches: int, batch_size: int, init_from, repeats: int = 1,
               first: list[int] | None = None) -> None:
    """LoRA-SB averages its first-step estimate over a subset of the training data, each sample once
    (paper Eq. (7)): the first ``batches`` micro-batches must hold distinct subject images (the first
    epoch's order), else some images would weigh twice in the init direction. ``first``: the images of those
    micro-batches in the run's bucket order (buckets.first_images)."""
    need = batches * batch_size
    if need > images:
        fix = (f"set adapter.sb_batches <= {images // batch_size}" if images >= batch_size else
               f"set train.batch_size <= {images} and adapter.sb_batches <= {images}")
        raise AdapterError(
            f"adapter.init lora_sb estimates its first step from adapter.sb_batches x train.batch_size = "
            f"{batches} x {batch_size} = {need} distinct subject images, but data.instance_dir has {images} "
            f"-> fix: {fix}, or add images")
    if repeats > 1:
        raise AdapterError(f"adapter.init lora_sb estimates its first step from distinct subject images, but "
                           f"data.repeats {repeats} repeats each image inside an epoch -> fix: set "
                           "data.repeats=1 for a run with a lora_sb arm")
    if first is not None and len(set(first)) < len(first):
        raise AdapterError(f"adapter.init lora_sb estimates its first step from distinct subject images, but with "
                           f"this run's buckets its first {batches} micro-batches repeat images (a bucket smaller "
                           "than train.batch_size is filled up, and each data.resolution repeats every image) "
                           "-> fix: set train.batch_size=1 and a single data.resolution, or data.buckets=false")
    if init_from is not None:
        raise AdapterError("adapter.init_from cannot start a lora_sb arm: LoRA-SB builds its frozen "
                           "bases from the data's first-step gradient -> fix: drop adapter.init_from "
                           "or train that file with another init")


@torch.no_grad()
def factors(G: Tensor, rank: int, lr1: float, generator: torch.Generator | None = None,
            niter: int = SVD_NITER) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
    """(A (r, m), B (n, r), R (r, r), stats) with s B R A = trunc_r(-lr1 sign(G)), from a randomized
    truncated SVD (q = inits.lowrank_q(r, n, m) columns, ``niter`` subspace iterations). G is not changed."""
    if G.ndim != 2:
        raise inits.InitError(f"{METHOD}: the gradient must be 2-D (got {tuple(G.shape)})")
    n, m = G.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, m):
        raise inits.InitError(f"rank must be in [1, min(n, m)] = [1, {min(n, m)}] for {METHOD} on a layer of "
                              f"shape (n={n}, m={m}) (got {rank!r}) -> fix: use adapter.rank <= {min(n, m)} "
                              "or leave this layer out of the targets")
    if not (math.isfinite(lr1) and lr1 > 0):
        raise inits.InitError(f"{METHOD}: the first-step learning rate must be > 0 (got {lr1!r})")
    dW = torch.sign(G.float()).mul_(-lr1)  # paper Eq. (6): the first AdamW update (G itself is kept)
    nonzero = int(torch.count_nonzero(dW))
    if nonzero == 0:
        raise inits.InitError(f"{METHOD}: the loss gradient of this layer's weight is zero on every estimation "
                              "batch, so there is no update direction to start from -> fix: leave the layer "
                              "out of the targets or use another init")
    U, S, V = inits._svd_lowrank(dW, inits.lowrank_q(rank, n, m), niter, generator)
    del dW
    B, A = U[:, :rank].contiguous(), V[:, :rank].T.contiguous()
    R = torch.diag(S[:rank] / SCALE)  # s B R A = U_r S_r V_r^T
    total = nonzero * lr1 * lr1  # ||dW1||_F^2: every non-zero entry is +-lr1
    stats = {"sigma_1": float(S[0]), "energy_share": float(S[:rank].square().sum()) / total,
             "sign_density": nonzero / (n * m), "eta1": lr1}
    return A, B, R, stats


def layer_init(layer: nn.Module, G: Tensor, rank: int, scale: float, lr1: float, gen: torch.Generator):
    """One layer's init (initpass.py): ((A, B, R), stats) from its accumulated gradient; ``lr1`` is the
    first non-zero learning rate (the scale is SCALE, the table's fixed_scale)."""
    A, B, R, stats = factors(G, rank, lr1, gen)
    return (A, B, R), stats


@torch.no_grad()
def write_core(layer: SBLinear, A: Tensor, B: Tensor, R: Tensor) -> None:
    """Copy the init into an attached SBLinear: frozen A, B and the trainable core R."""
    for holder, value in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_R, R)):
        holder[NAME].weight.copy_(value)


def export_factors(layer: SBLinear) -> tuple[Tensor, Tensor]:
    """(A, B R) in fp32: the plain rank-r LoRA with the same delta (docs/methods.md section 3.3)."""
    a, r, b = (f[NAME].weight.detach().float() for f in (layer.lora_A, layer.lora_R, layer.lora_B))
    return a, b @ r
