"""The gradient pass of the data-driven inits (methods.py, needs GRADIENTS): the training loss's gradient
with respect to every target weight, accumulated over micro-batches, with no weight requiring a gradient.
Memory: one fp32 (n, m) accumulator per target weight, nothing else."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def _capture(acc: Tensor):
    """Forward hook adding this call's dL/dW = grad_out^T x (rows = every token of the batch) to ``acc``
    once backward reaches the layer's output. The output is made a graph leaf when nothing before it
    needs a gradient (the base is frozen), so every target gets its gradient without any weight having
    requires_grad: int8 / nf4 weights cannot, and no other parameter's gradient is ever formed."""
    def hook(module, args, out):
        if not torch.is_grad_enabled():
            return None
        x = args[0].detach()
        if not out.requires_grad:
            out = out.detach().requires_grad_()

        def add(grad_out: Tensor) -> None:
            g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
            acc.addmm_(g2.T.to(acc.dtype), x2.to(acc.dtype))

        out.register_hook(add)
        return out
    return hook


def stat_bytes(layer: nn.Module) -> int:
    """Bytes of one target's accumulator: fp32 (n, m)."""
    return 4 * layer.out_features * layer.in_features


@contextlib.contextmanager
def weight_gradients(model: nn.Module, targets: list[str]):
    """Inside the block, each backward adds dL/dW of every target layer into the yielded dict
    {name: fp32 (n, m) tensor on the layer's device}: one accumulator per target weight is the only
    memory it adds (the gradients of the target weights, nothing else). All parameters are frozen inside."""
    grads, handles = {}, []
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        for name in targets:
            layer = model.get_submodule(name)
            acc = torch.zeros(layer.out_features, layer.in_features, device=layer.weight.device)
            grads[name] = acc
            handles.append(layer.register_forward_hook(_capture(acc)))
        yield grads
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
