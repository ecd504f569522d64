"""Layer kind OFFSET of the method table (methods.py): the adapted layer of PiSSA, LoRAM, OLoRA, MiLoRA.

Their init B0 A0 is not zero, so the layer computes W x + s (B A - B0 A0) x with the frozen copy (A0, -B0)
cancelling the init at step 0 (docs/methods.md section 6). It runs as ONE adapter branch of rank 2r:

    y = base_layer(x) + s [B, -B0] [A; A0] x

two thin matmuls like a plain LoRA's, instead of two rank-r branches (peft with a second adapter ran
every layer's adapter path twice: PiSSA / LoRAM arms were 5-35% slower per step than LoRA). A and B train;
the frozen halves only ride along (their weight gradient is never kept). With adapter.dropout > 0 the two
halves stay separate, because dropout applies to the trained path only.

Parameter names follow peft's two-adapter layout (``lora_A.subject``, ``lora_A.offset``, ...), so
checkpoints, resume, init_from and the export read the same tensors as before; ``detach`` puts the
original module back (the base is never rewritten: docs/design.md decision 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxlora.layers import OFFSET, SUBJECT, Factor, train_subject_factors, unwrap, wrap


class OffsetLinear(nn.Module):
    """A target linear layer (nn.Linear or a bitsandbytes one) with the offset-cancelled LoRA path."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float):
        super().__init__()
        n, m, device = base.out_features, base.in_features, base.weight.device
        self.base_layer = base
        self.lora_A = nn.ModuleDict({SUBJECT: Factor(rank, m, device), OFFSET: Factor(rank, m, device)})
        self.lora_B = nn.ModuleDict({SUBJECT: Factor(n, rank, device), OFFSET: Factor(n, rank, device)})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.scaling = scale

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        a, a0 = self.lora_A[SUBJECT].weight, self.lora_A[OFFSET].weight
        b, b0 = self.lora_B[SUBJECT].weight, self.lora_B[OFFSET].weight  # b0 holds -B0
        h = x.to(a.dtype)
        if self.dropout is None:
            delta = F.linear(F.linear(h, torch.cat([a, a0])), torch.cat([b, b0], dim=1))
        else:
            delta = F.linear(F.linear(self.dropout(h), a), b) + F.linear(F.linear(h, a0), b0)
        return result + (self.scaling * delta).to(result.dtype)


class OffsetLayers:
    """Attach / detach / freeze / export OffsetLinear layers (the interface of methods.LAYER_KINDS)."""

    @staticmethod
    def attach(model: nn.Module, targets: list[str], rank: int, scale: float, dropout: float, offset: bool) -> None:
        wrap(model, targets, lambda base: OffsetLinear(base, rank, scale, dropout))

    @staticmethod
    def detach(model: nn.Module, targets: list[str]) -> None:
        unwrap(model, targets, OffsetLinear)

    set_trainable = staticmethod(train_subject_factors)

    @staticmethod
    def export(layer: OffsetLinear, has_offset: bool) -> tuple[Tensor, Tensor]:
        """[A; A0], [B, -B0]: rank 2r, the exact delta against the pristine base."""
        a = torch.cat([layer.lora_A[SUBJECT].weight.float(), layer.lora_A[OFFSET].weight.float()])
        b = torch.cat([layer.lora_B[SUBJECT].weight.float(), layer.lora_B[OFFSET].weight.float()], dim=1)
        return a, b
