"""DoRA (adapter.dora, weight-decomposed LoRA, arXiv 2402.09353; docs/dora.md): peft's DoRA variant of the LoRA
layer kind, a trainable magnitude m per output row, W' = m (W + s B A) / ||W + s B A||_row. Here: the layer kind,
m set from the init's final factors, m read from files (adapter.init_from), and the export's DoRA part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fluxlora import methods
from fluxlora.adapters import AdapterInfo, PeftLayers, base_weight
from fluxlora.errors import AdapterError
from fluxlora.layers import SUBJECT


class DoraLayers(PeftLayers):
    """peft's LoRA layer with use_dora: the same layers plus ``lora_magnitude_vector.subject`` (trained, in
    checkpoints through its "lora_" name)."""

    dora = True

    @classmethod
    def attach(cls, model, targets, rank, scale, dropout, offset: bool) -> None:
        cpu_int8 = [n for n in targets if type(model.get_submodule(n).weight).__name__ == "Int8Params"
                    and model.get_submodule(n).weight.device.type == "cpu"]
        if cpu_int8:  # peft's dequantize_module_weight re-wraps a CPU weight: bnb then loses its row scales
            raise AdapterError(f"adapter.dora on an int8 (bitsandbytes) base on the CPU ({cpu_int8[0]}, ...): peft "
                               "0.21's DoRA re-creates the int8 weight on every forward there and bitsandbytes "
                               "loses its row scales -> fix: train on a GPU, or use model.quantize nf4 or none")
        super().attach(model, targets, rank, scale, dropout, offset)


def layer_kind(m: methods.Method):
    """DoRA exists for peft's LoRA layer kind only (the config refuses the others: config.AdapterConfig)."""
    if m.layer != methods.LORA:
        raise AdapterError(f"adapter.dora: {m.name} trains through the {m.layer!r} layer kind, and DoRA is "
                           "peft's LoRA layer's variant -> fix: set adapter.dora: false for it")
    return DoraLayers


def _magnitude(layer) -> nn.Parameter:
    return layer.lora_magnitude_vector[SUBJECT].weight


@torch.no_grad()
def init_magnitudes(model: nn.Module, targets: list[str]) -> None:
    """m = ||W + s B A||_row of every layer's current factors, computed as peft's DoRA forward computes its
    norm (DoraLinearLayer.get_lora_weight, get_weight_norm): each layer's output is then W x + s B A x, the
    method's own start (the base exactly for a zero product; W + s B0 A0 for lora_one). peft sets m when the
    adapter is added, from peft's init (B = 0), before our init writes A and B: hence this second pass."""
    from peft.utils.integrations import dequantize_module_weight

    for name in targets:
        layer = model.get_submodule(name)
        dora = layer.lora_magnitude_vector[SUBJECT]
        lora_weight = dora.get_lora_weight(lora_A=layer.lora_A[SUBJECT], lora_B=layer.lora_B[SUBJECT])
        weight = dequantize_module_weight(layer.get_base_layer()).to(lora_weight.dtype)
        dora.weight.copy_(dora.get_weight_norm(weight, lora_weight, layer.scaling[SUBJECT]).to(dora.weight))


def _delta(layer) -> torch.Tensor:
    return layer.scaling[SUBJECT] * (layer.lora_B[SUBJECT].weight.float() @ layer.lora_A[SUBJECT].weight.float())


def load_magnitudes(model: nn.Module, vectors) -> None:
    """A file's DoRA vectors (lorafile.DoraVectors) into the magnitudes: peft's m as it is, ComfyUI's
    dora_scale converted through the loaded factors (kohya_dora.magnitude)."""
    from fluxlora import kohya_dora, lorafile

    for name, v in vectors.vectors.items():
        layer = model.get_submodule(name)
        m = _magnitude(layer)
        if v.numel() != m.numel():
            raise AdapterError(f"adapter.init_from: {name}'s DoRA vector has {v.numel()} values, the layer "
                               f"{m.numel()} output rows")
        if vectors.rule == lorafile.COMFYUI:
            v = kohya_dora.magnitude(v.reshape(-1), base_weight(model, name), _delta(layer))
        m.copy_(v.reshape(-1).to(m))


@dataclass
class DoraExport:
    """What the export files of a DoRA arm carry beside the factors: peft's magnitudes, and the base weights
    the kohya/ComfyUI file's dora_scale is computed from (kohya_dora.py)."""

    magnitudes: dict[str, torch.Tensor]  # module -> m (n,), fp32 on the CPU
    base_weight: Callable[[str], torch.Tensor]  # any Linear module -> its pristine weight (n, m), fp32


@torch.no_grad()
def export_part(model: nn.Module, info: AdapterInfo) -> DoraExport | None:
    """The arm's DoRA part of the export (None for an arm without DoRA)."""
    if not info.dora:
        return None
    mags = {name: _magnitude(model.get_submodule(name)).detach().float().cpu().clone() for name in info.targets}
    return DoraExport(mags, lambda name: base_weight(model, name).cpu())
