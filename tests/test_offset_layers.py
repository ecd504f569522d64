"""The offset methods' layer (fluxlora/offset_layers.py): W x + s (B A - B0 A0) x as one rank-2r branch,
the same math as two rank-r branches, only A and B trained, peft's tensor names kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fluxlora import adapters
from fluxlora.offset_layers import OFFSET, SUBJECT, OffsetLinear


def filled(rank: int = 3, scale: float = 0.7, dropout: float = 0.0, seed: int = 0) -> OffsetLinear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(12, 10)
    with torch.no_grad():
        base.weight.copy_(torch.randn(10, 12, generator=g))
        base.bias.copy_(torch.randn(10, generator=g))
    layer = OffsetLinear(base, rank, scale, dropout)
    with torch.no_grad():
        for holder, shape in ((layer.lora_A, (rank, 12)), (layer.lora_B, (10, rank))):
            for key in (SUBJECT, OFFSET):
                holder[key].weight.copy_(torch.randn(*shape, generator=g))
    return layer


def reference(layer: OffsetLinear, x: torch.Tensor) -> torch.Tensor:
    """Two separate branches in float64: W x + b + s (B A x) + s (-B0) (A0 x)."""
    d = torch.float64
    w, b = layer.base_layer.weight.to(d), layer.base_layer.bias.to(d)
    a, bb = layer.lora_A[SUBJECT].weight.to(d), layer.lora_B[SUBJECT].weight.to(d)
    a0, b0 = layer.lora_A[OFFSET].weight.to(d), layer.lora_B[OFFSET].weight.to(d)
    x = x.to(d)
    return x @ w.T + b + layer.scaling * ((x @ a.T) @ bb.T + (x @ a0.T) @ b0.T)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_branch_computes_the_two_branch_delta(dropout):
    layer = filled(dropout=dropout).eval()  # eval: dropout is the identity, so both paths must agree
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_with_the_init_copied_into_the_offset_the_output_is_the_base():
    layer = filled()
    with torch.no_grad():
        layer.lora_A[OFFSET].weight.copy_(layer.lora_A[SUBJECT].weight)
        layer.lora_B[OFFSET].weight.copy_(-layer.lora_B[SUBJECT].weight)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-5)


def test_only_a_and_b_train_and_the_offset_gets_no_gradient():
    layer = filled()
    model = nn.Sequential(layer)
    from fluxlora.offset_layers import OffsetLayers

    OffsetLayers.set_trainable(model)
    layer(torch.randn(3, 12)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert {n for n, g in grads.items() if g is not None} == {"0.lora_A.subject.weight", "0.lora_B.subject.weight"}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_forward_is_one_adapter_branch():
    layer = filled()
    with CountMatmuls() as counter:
        layer(torch.randn(3, 12))
    assert counter.count == 3  # the base layer, x A'^T, then (.) B'^T: a plain LoRA's count


def test_offset_arms_keep_peft_tensor_names(tiny_flux):
    from fluxlora import modelpath
    from fluxlora.families.flux import FAMILY as flux

    pipe = modelpath.load_base(flux, str(tiny_flux), "fp32", None, "none")
    model = pipe.transformer
    targets = adapters.find_targets(model, flux.target_presets["attn"], blocks_only=True)
    info = adapters.inject(model, "pissa", 2, 1.0, targets)
    keys = set(adapters.adapter_state(model))
    for name in targets:  # the names checkpoints written by the two-adapter layout used
        assert {f"{name}.lora_{f}.{k}.weight" for f in "AB" for k in (SUBJECT, OFFSET)} <= keys
    assert len(keys) == 4 * len(targets)
    adapters.remove(model, info)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the pristine base again
