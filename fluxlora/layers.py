"""What the adapter layers share (peft's, offset_layers.OffsetLinear, lora_sb.SBLinear): the adapter keys, the
rule of which factors train, a factor holder in peft's ``lora_A[name].weight`` layout, and swapping target
modules for wrappers and back."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SUBJECT, OFFSET = "subject", "offset"  # the trained adapter and the frozen init term (offset methods)
# The denoisers' repeated blocks by module-name prefix: FLUX.1 / FLUX.2 / SD3 (transformer_blocks,
# single_transformer_blocks), Z-Image (layers and its noise / context refiner blocks). The presets and the
# int8 / nf4 quantization stay inside them.
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.", "layers.", "noise_refiner.",
                  "context_refiner.")


def in_blocks(name: str) -> bool:
    """Whether module ``name`` lies inside the denoiser's blocks (UNets: any ``*blocks.`` on the path, e.g.
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``)."""
    return name.startswith(BLOCK_PREFIXES) or "blocks." in name


class Factor(nn.Module):
    """Holds one factor as ``.weight`` (fp32, zero-filled: building the structure draws from no RNG)."""

    def __init__(self, rows: int, cols: int, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, device=device), requires_grad=False)


# What trains of the SUBJECT adapter: its factors and, with DoRA (adapter.dora, peft's layer only), the
# per-output-row magnitude (peft's ``lora_magnitude_vector.subject.weight``).
TRAINED = ("lora_A", "lora_B", "lora_magnitude_vector")


def train_subject_factors(model: nn.Module) -> None:
    """Only the SUBJECT adapter's A and B (and DoRA's magnitude) train; the base, a frozen offset and everything
    else do not."""
    for n, p in model.named_parameters():
        p.requires_grad_(f".{SUBJECT}." in n and any(t in n for t in TRAINED))


@torch.no_grad()
def write_factors(layer: nn.Module, A0: torch.Tensor, B0: torch.Tensor, offset: bool) -> None:
    """An init's (A0, B0) into an attached layer: the trained factors start there and, with ``offset``, the
    frozen init term holds (A0, -B0) (docs/methods.md section 6)."""
    a, b = layer.lora_A[SUBJECT].weight, layer.lora_B[SUBJECT].weight
    a.copy_(A0.to(a)), b.copy_(B0.to(b))
    if offset:
        layer.lora_A[OFFSET].weight.copy_(A0.to(a))
        layer.lora_B[OFFSET].weight.copy_(-B0.to(b))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, child = name.rpartition(".")
    return (model.get_submodule(head) if head else model), child


def wrap(model: nn.Module, targets: list[str], make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace every target module by ``make(module)`` (which keeps it as its ``base_layer``)."""
    for name in targets:
        parent, child = _parent(model, name)
        setattr(parent, child, make(getattr(parent, child)))


def unwrap(model: nn.Module, targets: list[str], kind: type) -> None:
    """Put the original modules back where a ``kind`` wrapper sits (the pristine base for the next arm)."""
    for name in targets:
        parent, child = _parent(model, name)
        layer = getattr(parent, child)
        if isinstance(layer, kind):
            setattr(parent, child, layer.base_layer)
