"""Adapter injection, the init seam, trainable parameters and the exportable delta.

The only module that touches model structure. Base weights are never mutated (docs/design.md decision 1).
What happens for a method follows its row in the method table (methods.py): its layer kind (peft's LoRA
layer here, offset_layers' pair layer, or lora_sb's core layer), what its init reads (the weights, or the
loss gradient of a gradient pass) and what its init produces. A method with a non-zero initial product
B0 A0 (start OFFSET) also holds the frozen init term "offset" (A0, -B0), so every adapted layer computes
W x + s (B A - B0 A0) x and the step-0 output equals the base output; the export concatenates the two:
A' = [A; A0], B' = [B, -B0] (rank 2r, same scale), an exact delta against the pristine base
(docs/methods.md section 6).

DoRA (adapter.dora, arXiv 2402.09353; docs/dora.md) is peft's DoRA variant of the LoRA layer kind: a trainable
magnitude m per output row, W' = m (W + s B A) / ||W + s B A||_row, m set from the final init factors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fluxlora import methods
from fluxlora.errors import AdapterError, InitError
from fluxlora.layers import OFFSET, SUBJECT, in_blocks, train_subject_factors, write_factors


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
    dora: bool = False  # DoRA: peft's layer with a trained magnitude per output row (docs/dora.md)


def scale_for(rank: int, alpha: float, scaling: str, coefficient: float) -> float:
    """The adapter multiplier s: alpha/r (standard), alpha/sqrt(r) (rsLoRA, arXiv 2312.03732) or
    C/sqrt(r) (the LoRA-alpha square-root law, docs/methods.md section 4)."""
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
    decompose 2-D weight matrices, and a conv layer is out of scope for every method. Of an explicit list
    (not ``blocks_only``) every suffix must match something."""
    def wanted(n: str) -> bool:
        inside = not blocks_only or in_blocks(n)
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
    unmatched = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
    if unmatched and not blocks_only:  # an explicit list: a suffix that matches nothing is a typo, not a no-op
        raise AdapterError(f"adapter.target_modules {unmatched} match no Linear layer of the model (the others "
                           f"match {len(names)}) -> fix: correct or remove them")
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


def lora_config(rank: int, scale: float, targets: list[str], dropout: float, dora: bool = False):
    from peft import LoraConfig

    # peft's scaling is lora_alpha / r; express every rule through lora_alpha = s * r.
    return LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=targets, lora_dropout=dropout,
                      init_lora_weights=True, use_dora=dora)


@dataclass
class InitInputs:
    """What a data-driven init may read besides the weights (methods.py ``needs``): each pass's result by kind
    ({methods.GRADIENTS: ..., methods.ACTIVATIONS: ...}), computed on the pristine base before the adapter
    exists (train.init_passes), and the first non-zero learning rate."""

    passes: dict[str, object] = field(default_factory=dict)
    first_lr: float = 1.0


def _data_pass(m: methods.Method, inputs: InitInputs | None):
    """The result of the pass the method's init reads (methods.py ``needs``), or None for a weight-reading init."""
    if m.needs == methods.WEIGHTS:
        return None
    data = (inputs.passes if inputs is not None else {}).get(m.needs)
    if data is None:
        what, which = methods.PASSES[m.needs]
        raise AdapterError(f"{m.name} initializes from {what}, and no {which} was given -> fix: "
                           "train it through the trainer (fluxlora train)")
    return data


def inject(model: nn.Module, method: str, rank: int, scale: float, targets: list[str], *,
           dropout: float = 0.0, seed: int = 0, niter: int = 4, skip_init: bool = False,
           inputs: InitInputs | None = None, dora: bool = False) -> AdapterInfo:
    """Add the arm's adapter layers and initialize them as the method's table row says. ``skip_init`` only
    builds the structure (resume or adapter.init_from load the tensors right after). ``dora``: peft's DoRA
    layer, its magnitude set from the init's factors (so step 0 is the method's own start)."""
    from fluxlora import dora_layers  # imports this module

    m = methods.get(method)
    kind = dora_layers.layer_kind(m) if dora else m.layer_kind()
    scale = m.fixed_scale if m.fixed_scale is not None else scale
    info = AdapterInfo(method, rank, scale, targets, has_offset=m.start == methods.OFFSET, dora=dora)
    t0 = time.perf_counter()
    data = None if skip_init else _data_pass(m, inputs)  # a gradient or activation pass, or None
    info.init_seconds = time.perf_counter() - t0 if data is not None else 0.0
    kind.attach(model, targets, rank, scale, dropout, info.has_offset)
    if not skip_init:
        t0 = time.perf_counter()
        try:
            info.layers = (_init_from_weights(model, m, rank, scale, targets, seed, niter, info.has_offset)
                           if data is None else
                           m.init_fn()(model, data, rank, scale, (inputs or InitInputs()).first_lr, seed))
        except (InitError, AdapterError) as e:
            kind.detach(model, targets)  # leave the pristine base behind for the next arm
            raise AdapterError(str(e)) from e
        except Exception:
            kind.detach(model, targets)
            raise
        if dora:  # peft set m at add_adapter, before the init wrote A and B
            dora_layers.init_magnitudes(model, targets)
        info.init_seconds += time.perf_counter() - t0
    kind.set_trainable(model)
    info.trainable_params = sum(p.numel() for p in trainable_parameters(model))
    return info


@torch.no_grad()
def _init_from_weights(model, m: methods.Method, rank, scale, targets, seed, niter, has_offset) -> dict:
    """One layer at a time, in fp32 on the layer's device: no second copy of the model."""
    gen = torch.Generator("cpu").manual_seed(seed)
    fn, stats = m.init_fn(), {}
    for name in targets:
        layer = model.get_submodule(name)
        W = float_weight(layer.get_base_layer())
        try:
            res = fn(W, rank, scale, generator=gen, niter=niter)
        except InitError as e:
            raise AdapterError(f"{name} ({W.shape[0]}x{W.shape[1]}): {e}") from e
        write_factors(layer, res.A0, res.B0, has_offset)
        stats[name] = res.stats
    return stats


class PeftLayers:
    """Layer kind LORA (methods.py): peft's LoRA layers, one trainable "subject" adapter (the methods whose
    init product is zero; the offset ones use offset_layers.OffsetLayers)."""

    dora = False

    @classmethod
    def attach(cls, model, targets, rank, scale, dropout, offset: bool) -> None:
        if offset:
            raise AdapterError("peft's LoRA layer kind holds no frozen offset (methods.py gives OFFSET methods "
                               "the pair layer kind)")
        model.add_adapter(lora_config(rank, scale, targets, dropout, cls.dora), adapter_name=SUBJECT)
        model.set_adapters([SUBJECT])

    @staticmethod
    def detach(model, targets) -> None:
        model.unload_lora()

    # Activating adapters turns requires_grad on for all of them: only "subject" A/B (and m) may train.
    set_trainable = staticmethod(train_subject_factors)

    @staticmethod
    def export(layer, has_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A[SUBJECT].weight.float(), layer.lora_B[SUBJECT].weight.float()


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
    """Every adapter tensor of the model from ``state`` and nothing else (a DoRA checkpoint into a plain
    adapter, or the reverse, would otherwise load half an adapter)."""
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    absent = [k for k in params if "lora_" in k and k not in state]
    for what, keys in (("has adapter tensors the model lacks", missing), ("lacks adapter tensors", absent)):
        if keys:
            dora = (" (DoRA's magnitude: adapter.dora must be what the arm was trained with)"
                    if any("lora_magnitude_vector" in k for k in keys) else "")
            raise AdapterError(f"checkpoint {what}: {keys[:3]}{dora}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def remove(model: nn.Module, info: AdapterInfo) -> None:
    """Take the arm's adapters out, restoring the original modules: the pristine base for the next arm."""
    methods.get(info.method).layer_kind().detach(model, info.targets)


@torch.no_grad()
def export_factors(model: nn.Module, info: AdapterInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A', B')} in fp32 on the CPU whose product s B' A' is the arm's exact delta against the
    pristine base (rank 2r with an offset adapter: [A; A0], [B, -B0])."""
    kind = methods.get(info.method).layer_kind()
    out = {}
    for name in info.targets:
        a, b = kind.export(model.get_submodule(name), info.has_offset)
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
    and a file without one gets a zero init term. A DoRA arm takes the file's magnitudes (``layers.dora``,
    lorafile.FileLayers), else m = ||W + s B A||_row of the file's factors: step 0 is the file's model either
    way. A DoRA file is refused by an arm without DoRA (the adapters are removed first: the base stays
    pristine for the next arm)."""
    from fluxlora import dora_layers

    vectors = getattr(layers, "dora", None)
    if vectors is not None and not info.dora:
        remove(model, info)
        raise AdapterError("adapter.init_from: the file is a DoRA adapter (a magnitude per output row beside its "
                           "factors), which this arm would drop -> fix: set adapter.dora: true to continue it")
    for name in info.targets:
        _load_pair(model.get_submodule(name), name, info, layers[name], offset)
    if info.dora:
        dora_layers.init_magnitudes(model, info.targets)
        if vectors is not None:
            dora_layers.load_magnitudes(model, vectors)


def _load_pair(layer, name: str, info: AdapterInfo, factors, offset: bool) -> None:
    a, b, s_file = factors
    b = b * (s_file / info.scale)
    r = a.shape[0] // 2 if offset else a.shape[0]
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


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    """Module ``name``'s pristine base weight in fp32 (n, m), adapted or not (read only: may share storage)."""
    layer = model.get_submodule(name)
    return float_weight(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)
