"""8-bit / 4-bit base weights with bitsandbytes, by swapping the transformer blocks' nn.Linear layers.

diffusers' BitsAndBytesConfig loader refuses to run without a GPU, so the layers are swapped by hand
(works on CPU and CUDA alike; docs/design.md decision 3). The quantized weights are frozen; LoRA trains on top.
"""

from __future__ import annotations

import torch
from torch import nn

from fluxlora.layers import BLOCK_PREFIXES


def _quantized(layer: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    # bitsandbytes quantizes a weight when it moves to its device; built from a CPU copy, the move at the
    # end quantizes on CUDA as well as on the CPU (a weight already on the GPU would not be moved).
    w = layer.weight.data.detach().cpu()
    device = layer.weight.device
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    elif mode == "nf4":
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it runs in
        # eval mode (our step-0 samples); its training path cannot use that layout (the next training step
        # fails in matmul_4bit). Keep the portable layout: the same numbers, and training keeps working.
        q.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"unknown quantization {mode!r}; valid: none, int8, nf4")
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
    return q.to(device)  # moving the module quantizes the weight


def quantize_transformer(model: nn.Module, mode: str, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace the Linear layers of the transformer blocks in place; returns how many were swapped."""
    if mode == "none":
        return 0
    swapped = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.startswith(BLOCK_PREFIXES):
                setattr(parent, child_name, _quantized(child, mode, compute_dtype))
                swapped += 1
    return swapped
