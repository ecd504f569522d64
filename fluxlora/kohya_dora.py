"""DoRA in the kohya / ComfyUI file: a ``<prefix>.dora_scale`` (rows, 1) beside each adapter, written so that
ComfyUI's rule gives peft's DoRA weight (docs/dora.md).

peft (tuners/lora/dora.py, ``DoraLinearLayer``) trains, per output row,

    W' = m * (W + s B A) / ||W + s B A||_row                    (the norm detached)

ComfyUI applies a file's ``dora_scale`` in ``weight_decompose`` (comfy/weight_adapter/base.py, called by
``LoRAAdapter.calculate_weight`` in comfy/weight_adapter/lora.py), with W the weight it patches (fp32 in
ModelPatcher.patch_weight_to_device):

    W_c = W + alpha / rank * up @ down
    norm = ||W||_row      if dora_scale.shape[0] == W.shape[0]   (per output row, of W BEFORE the delta)
           ||W_c||_col    otherwise                              (per input column, of W_c)
    W' = W_c * dora_scale / (norm + finfo(W.dtype).eps)

Only the output-axis branch scales rows, and it divides by the base's norm, not by ||W_c||. So the file holds
``dora_scale = m * (||W||_row + eps) / ||W_c||_row`` as an (rows, 1) column (a 1-D vector would broadcast to
(rows, rows) there): ComfyUI then computes m * W_c / ||W_c||_row, peft's weight. The scale depends on the base
weights, which the export reads from the model it trained on. A fused module (FLUX's qkv, linear1) is one
ComfyUI weight whose rows are its parts' rows: its dora_scale is the parts' scales stacked in row order, and a
part without an adapter gets ||W_p||_row + eps, which leaves its rows as they are. Swapped halves (the final
adaLN) swap the scale's halves too.
"""

from __future__ import annotations

import torch

from fluxlora import kohya
from fluxlora.kohya import PREFIX, swap_halves

EPS = torch.finfo(torch.float32).eps  # ComfyUI's eps for the fp32 weight its patcher computes on
SUFFIX = ".dora_scale"


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(w.float(), dim=1, dtype=torch.float64)


def dora_scale(m: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """ComfyUI's dora_scale (n, 1) for peft's magnitude ``m`` (n,) of ``weight`` + ``delta`` (n, m)."""
    scale = m.double() * (_row_norm(weight) + EPS) / _row_norm(weight.float() + delta.float())
    return scale.float().unsqueeze(1)


def magnitude(scale: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """peft's magnitude (n,) of a ComfyUI dora_scale (n,) or (n, 1): the inverse of ``dora_scale``."""
    m = scale.reshape(-1).double() * _row_norm(weight.float() + delta.float()) / (_row_norm(weight) + EPS)
    return m.float()


def _groups(names, family: str) -> dict[str, tuple[str, ...]]:
    keys = kohya.keymap(family)
    groups: dict[str, tuple[str, ...]] = {}
    for name in names:
        key, parts = keys.module(name)
        groups.setdefault(key, parts)
    return groups


@torch.no_grad()
def scales(state: dict[str, torch.Tensor], dora, out_features: dict[str, int], family: str) -> dict[str, torch.Tensor]:
    """``<prefix>.dora_scale`` of every adapter of the kohya ``state`` (as written: cast, folded, swapped; ComfyUI
    applies exactly these tensors), from the DoRA arm's dora_layers.DoraExport ``dora``; fp32 (rows, 1)."""
    keys, out = kohya.keymap(family), {}
    for key, parts in _groups(dora.magnitudes, family).items():
        down = state[f"{PREFIX}{key}.lora_down.weight"].float()
        up = state[f"{PREFIX}{key}.lora_up.weight"].float()
        swapped = keys.swapped(key, out_features)
        up = swap_halves(up) if swapped else up  # diffusers' row order
        alpha = float(state[f"{PREFIX}{key}.alpha"]) / down.shape[0]
        col, start = [], 0
        for part in parts:
            w, rows = dora.base_weight(part), slice(start, start + out_features[part])
            start = rows.stop
            if part in dora.magnitudes:
                col.append(dora_scale(dora.magnitudes[part], w, alpha * up[rows] @ down))
            else:  # no adapter on this part: its rows stay W
                col.append((_row_norm(w) + EPS).float().unsqueeze(1))
        col = torch.cat(col)
        out[f"{PREFIX}{key}{SUFFIX}"] = swap_halves(col) if swapped else col
    return out


def read(state, out_features: dict[str, int], layers: dict, family: str):
    """The comfyui format's DoRA vectors (formats.py): each ``dora_scale`` split into its parts' rows (diffusers
    order), kept for the parts the file's factors adapt; rule lorafile.COMFYUI. None for a file without."""
    from fluxlora.lorafile import COMFYUI, DoraVectors

    state, keys = kohya.kohya_names(state), kohya.keymap(family)
    known = {m[0]: m[1] for m in map(keys.module, out_features) if m}
    vectors = {}
    for k in [k for k in state if k.endswith(SUFFIX)]:
        base = k[len(PREFIX):-len(SUFFIX)]
        if base not in known:
            raise KeyError(f"{k}: no module of this {family} model has this name")
        parts = known[base]
        sizes = [out_features[p] for p in parts]
        scale = state[k].float()
        if tuple(scale.shape) != (sum(sizes), 1):
            raise KeyError(f"{k} has shape {tuple(scale.shape)}, not one value per output row ({sum(sizes)}, 1): "
                           "ComfyUI normalises such a DoRA file per input column, and fluxlora's DoRA (peft's) "
                           "keeps one magnitude per output row, so it cannot continue it exactly -> fix: start "
                           "from a file with per-row magnitudes (our adapter.safetensors) or a plain LoRA")
        scale = swap_halves(scale) if keys.swapped(base, out_features) else scale
        vectors.update({p: v.reshape(-1) for p, v in zip(parts, scale.split(sizes)) if p in layers})
    return DoraVectors(COMFYUI, vectors) if vectors else None
