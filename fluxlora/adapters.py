"""Adapter injection through peft, the init seam, trainable parameters and the exportable delta.

The only module that touches model structure (STYLE rule 10). Base weights are never mutated
(DESIGN decision 1): a method with a non-zero initial product B0 A0 gets a second, frozen adapter
"offset" holding (A0, -B0), so every adapted layer computes W x + s (B A - B0 A0) x and the step-0
output equals the base output. Export concatenates the two: A' = [A; A0], B' = [B, -B0] (rank 2r, same
scale), an exact delta against the pristine base.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from fluxlora import inits, lora_sb

SUBJECT, OFFSET = "subject", "offset"


class AdapterError(ValueError):
    """A user-facing problem with the adapter settings (targets, rank, ...)."""


@dataclass
class AdapterInfo:
    method: str
    rank: int
    scale: float  # the multiplier s of B A
    targets: list[str]
    has_offset: bool
    init_seconds: float = 0.0
    trainable_params: int = 0
    layers: dict[str, dict] = field(default_factory=dict)  # per-layer init statistics
    init_from: str | None = None  # the LoRA file the arm started from (adapter.init_from)


def scale_for(rank: int, alpha: float, scaling: str, coefficient: float) -> float:
    """The adapter multiplier s: alpha/r (standard), alpha/sqrt(r) (rsLoRA, arXiv 2312.03732) or
    C/sqrt(r) (the LoRA-alpha square-root law, METHODS.md section 4)."""
    if scaling == "standard":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    if scaling == "lora_alpha":
        return coefficient / math.sqrt(rank)
    raise AdapterError(f"unknown adapter.scaling {scaling!r}; valid: standard, rslora, lora_alpha")


def find_targets(model: nn.Module, suffixes: list[str], blocks_only: bool = False) -> list[str]:
    """Full names of the nn.Linear modules whose name ends with one of ``suffixes`` (``blocks_only``: inside
    the transformer / UNet blocks, as the presets mean). Convolutions are refused: the init methods
    decompose 2-D weight matrices, and a conv layer is out of scope for every method."""
    def wanted(n: str) -> bool:
        inside = not blocks_only or "blocks." in n
        return inside and any(n == s or n.endswith("." + s) for s in suffixes)

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and wanted(n)]
    if convs:
        raise AdapterError(f"adapter targets {convs[:4]} are convolution layers; fluxlora adapts Linear layers "
                           "only (PiSSA, LoRAM and the other inits decompose 2-D weight matrices) -> fix: remove "
                           "them from adapter.target_modules")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and wanted(n)]
    if not names:
        raise AdapterError(f"no Linear layer of the model matches adapter targets {suffixes} -> fix: "
                           "use a preset (attn, attn_context, wide) or module-name suffixes such as to_q")
    return names


def float_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as fp32 (n, m), dequantizing bitsandbytes int8 / 4-bit weights."""
    w = layer.weight
    cls = type(w).__name__
    if cls == "Int8Params":
        # bitsandbytes moves the row scales from the weight to the layer state after a forward.
        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return w.data.float() * scb.float().unsqueeze(1) / 127.0
    if cls == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()


def lora_config(rank: int, scale: float, targets: list[str], dropout: float):
    from peft import LoraConfig

    # peft's scaling is lora_alpha / r; express every rule through lora_alpha = s * r.
    return LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=targets, lora_dropout=dropout,
                      init_lora_weights=True)


def inject(model: nn.Module, method: str, rank: int, scale: float, targets: list[str], *,
           dropout: float = 0.0, seed: int = 0, niter: int = 4, skip_init: bool = False,
           sb_gradients=None, sb_lr: float = 1.0) -> AdapterInfo:
    """Add the trainable "subject" adapter (and the frozen "offset" when B0 A0 != 0) and initialize it.

    ``skip_init`` only builds the structure (resume loads the saved tensors right after). lora_sb
    takes ``sb_gradients()`` (-> {target: summed dL/dW}) and the first-step LR ``sb_lr``; its scale is 1."""
    if method == lora_sb.METHOD:
        return _inject_sb(model, rank, targets, dropout, seed, skip_init, sb_gradients, sb_lr)
    if method not in inits.INITS:
        valid = sorted([*inits.INITS, lora_sb.METHOD])
        raise AdapterError(f"unknown adapter.init {method!r}; valid: {', '.join(valid)}")
    has_offset = method not in inits.ZERO_PRODUCT
    model.add_adapter(lora_config(rank, scale, targets, dropout), adapter_name=SUBJECT)
    if has_offset:
        with warnings.catch_warnings():  # a second adapter on purpose: peft warns about exactly that
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            model.add_adapter(lora_config(rank, scale, targets, 0.0), adapter_name=OFFSET)
    model.set_adapters([SUBJECT, OFFSET] if has_offset else [SUBJECT])
    info = AdapterInfo(method, rank, scale, targets, has_offset)
    if not skip_init:
        t0 = time.perf_counter()
        try:
            info.layers = _initialize(model, method, rank, scale, targets, seed, niter, has_offset)
        except Exception:
            model.unload_lora()  # leave the pristine base behind for the next arm
            raise
        info.init_seconds = time.perf_counter() - t0
    _freeze_all_but_subject(model)
    info.trainable_params = sum(p.numel() for p in trainable_parameters(model))
    return info


def _inject_sb(model, rank, targets, dropout, seed, skip_init, sb_gradients, sb_lr) -> AdapterInfo:
    """LoRA-SB (lora_sb.py): the estimation pass on the pristine base, then the wrapped layers."""
    if not skip_init and sb_gradients is None:
        raise AdapterError("lora_sb initializes from the training data's first-step gradient, and no gradient "
                           "pass was given -> fix: train it through the trainer (train.sb_gradients)")
    info = AdapterInfo(lora_sb.METHOD, rank, lora_sb.SCALE, targets, has_offset=False)
    t0 = time.perf_counter()
    grads = None if skip_init else sb_gradients()
    lora_sb.attach(model, targets, rank, dropout)
    if grads is not None:
        try:
            info.layers = lora_sb.initialize(model, grads, rank, sb_lr, seed)
        except inits.InitError as e:
            lora_sb.detach(model, targets)
            raise AdapterError(str(e)) from e
        info.init_seconds = time.perf_counter() - t0
    lora_sb.set_trainable(model)
    info.trainable_params = sum(p.numel() for p in trainable_parameters(model))
    return info


def check_lora_sb(images: int, sb_batches: int, batch_size: int, init_from) -> None:
    """LoRA-SB averages its first-step estimate over a subset of the training data, each sample once
    (paper Eq. (7)): the first sb_batches micro-batches must hold distinct subject images (the first
    epoch's order), else some images would weigh twice in the init direction."""
    need = sb_batches * batch_size
    if need > images:
        fix = (f"set adapter.sb_batches <= {images // batch_size}" if images >= batch_size else
               f"set train.batch_size <= {images} and adapter.sb_batches <= {images}")
        raise AdapterError(
            f"adapter.init lora_sb estimates its first step from adapter.sb_batches x train.batch_size = "
            f"{sb_batches} x {batch_size} = {need} distinct subject images, but data.instance_dir has {images} "
            f"-> fix: {fix}, or add images")
    if init_from is not None:
        raise AdapterError("adapter.init_from cannot start a lora_sb arm: LoRA-SB builds its frozen "
                                    "bases from the data's first-step gradient -> fix: drop adapter.init_from "
                                    "or train that file with another init")


@torch.no_grad()
def _initialize(model, method, rank, scale, targets, seed, niter, has_offset) -> dict[str, dict]:
    """One layer at a time, in fp32 on the layer's device: no second copy of the model."""
    gen = torch.Generator("cpu").manual_seed(seed)
    stats = {}
    for name in targets:
        layer = model.get_submodule(name)
        W = float_weight(layer.get_base_layer())
        try:
            res = inits.init_factors(method, W, rank, scale, generator=gen, niter=niter)
        except inits.InitError as e:
            raise AdapterError(f"{name} ({W.shape[0]}x{W.shape[1]}): {e}") from e
        a, b = layer.lora_A[SUBJECT].weight, layer.lora_B[SUBJECT].weight
        a.copy_(res.A0.to(a)), b.copy_(res.B0.to(b))
        if has_offset:
            layer.lora_A[OFFSET].weight.copy_(res.A0.to(a))
            layer.lora_B[OFFSET].weight.copy_(-res.B0.to(b))
        stats[name] = res.stats
    return stats


def _freeze_all_but_subject(model: nn.Module) -> None:
    # Activating adapters turns requires_grad on for all of them: only "subject" A/B may train.
    for n, p in model.named_parameters():
        p.requires_grad_(f".{SUBJECT}." in n and ("lora_A" in n or "lora_B" in n))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, lr_ratio_b: float) -> list[dict]:
    """Optimizer groups: A at lr, B at lr * lr_ratio_b (LoRA+, arXiv 2402.12354)."""
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    return [{"params": a, "lr": lr, "name": "A"}, {"params": b, "lr": lr * lr_ratio_b, "name": "B"}]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All LoRA tensors of both adapters (for checkpoints)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise AdapterError(f"checkpoint has adapter tensors the model lacks: {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def remove(model: nn.Module, info: AdapterInfo) -> None:
    """Take the arm's adapters out, restoring the original modules: the pristine base for the next arm."""
    if info.method == lora_sb.METHOD:
        lora_sb.detach(model, info.targets)
    else:
        model.unload_lora()


@torch.no_grad()
def export_factors(model: nn.Module, info: AdapterInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A', B')} in fp32 on the CPU with the exact delta s B' A' = s (B A - B0 A0) against the
    pristine base: A' = [A; A0], B' = [B, -B0] (rank 2r) when there is an offset; (A, B R) for lora_sb."""
    out = {}
    for name in info.targets:
        layer = model.get_submodule(name)
        if info.method == lora_sb.METHOD:  # the whole delta B R A as (A, B R), rank r
            a, b = lora_sb.export_factors(layer)
            out[name] = (a.cpu().contiguous(), b.cpu().contiguous())
            continue
        a, b = layer.lora_A[SUBJECT].weight.float(), layer.lora_B[SUBJECT].weight.float()
        if info.has_offset:
            a = torch.cat([a, layer.lora_A[OFFSET].weight.float()], dim=0)
            b = torch.cat([b, layer.lora_B[OFFSET].weight.float()], dim=1)
        out[name] = (a.cpu().contiguous(), b.cpu().contiguous())
    return out


def linear_out_features(model: nn.Module) -> dict[str, int]:
    """Output size of every Linear module of the base (adapter wrappers seen through)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".lora_" not in name and ".base_layer" not in name:
            out[name] = m.out_features
        elif hasattr(m, "get_base_layer") and isinstance(m.get_base_layer(), nn.Linear):
            out[name] = m.get_base_layer().out_features
    return out


@torch.no_grad()
def load_factors(model: nn.Module, info: AdapterInfo, layers: dict, offset: bool) -> None:
    """Start the arm from given factors (adapter.init_from): layers[name] = (A, B, s_file) with delta
    s_file B A. The file's scale goes into B (exact), so the arm trains at its own scale. With
    ``offset`` the second half of each rank is the frozen init term; an arm with an offset adapter
    and a file without one gets a zero init term."""
    for name in info.targets:
        a, b, s_file = layers[name]
        b = b * (s_file / info.scale)
        r = a.shape[0] // 2 if offset else a.shape[0]
        layer = model.get_submodule(name)
        parts = [(SUBJECT, a[:r], b[:, :r])]
        if info.has_offset:
            parts.append((OFFSET, a[r:], b[:, r:]) if offset else
                         (OFFSET, torch.zeros_like(a), torch.zeros_like(b)))
        for adapter, fa, fb in parts:
            wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if wa.shape != fa.shape or wb.shape != fb.shape:
                raise AdapterError(f"{name}: file factors {tuple(fa.shape)}/{tuple(fb.shape)} do not fit the "
                                   f"adapter's {tuple(wa.shape)}/{tuple(wb.shape)}")
            wa.copy_(fa.to(wa)), wb.copy_(fb.to(wb))
