"""The kohya / ComfyUI key format of LoRA files, both ways, exactly, for every family with a key map.

kohya's sd-scripts, ComfyUI and Forge name an adapter after a module of the model's original checkpoint
(``lora_unet_<module, dots as underscores>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) and apply
``alpha / rank * up @ down`` to that module's weight. Where the original checkpoint fuses layers that
diffusers keeps apart (FLUX's and SD3's q, k, v), separate adapters (A_i, B_i) on the parts are one adapter
on the fused layer with

    down = [A_1; A_2; ...]        (ranks summed)
    up   = blockdiag(B_1, B_2, ...)   (a part without adapter contributes zero rows)

so ``up @ down`` stacks B_i A_i along the output: the exact fused delta, no approximation.

Each family's names live in a key map (kohya_flux.py, kohya_sd3.py, kohya_unet.py; the family table's
``kohya_keys`` names it), this module does the fusing, splitting, scale and alpha for all of them. A DoRA arm's
``.dora_scale`` beside each adapter is kohya_dora.py's.
"""

from __future__ import annotations

import importlib
import re
from typing import Protocol

import torch

PREFIX = "lora_unet_"


class KeyMap(Protocol):
    """One family's kohya names. ``module``: diffusers module -> (kohya key without the prefix, the
    diffusers modules fused in that key in output-row order), None when the original checkpoint has no
    such module. ``swapped``: the key's output rows are (shift, scale) where diffusers has (scale, shift).
    ``folded``: keys whose scale goes into ``up`` (alpha = rank) because a known reader ignores alpha
    there. ``drops``: warning lines for adapted modules a known loader of the file silently skips."""

    def module(self, name: str) -> tuple[str, tuple[str, ...]] | None: ...

    def swapped(self, key: str, out_features: dict[str, int]) -> bool: ...

    def folded(self, key: str) -> bool: ...

    def drops(self, names: list[str]) -> list[str]: ...


def keymap(family: str) -> KeyMap:
    from fluxlora.families import SPECS

    where = SPECS[family].kohya_keys
    if where is None:
        raise KeyError(f"the {family} family has no kohya/ComfyUI key map")
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr)


def table_module(name: str, blocks: tuple, top: dict[str, str]) -> tuple[str, tuple[str, ...]] | None:
    """A key map's ``module`` from its tables: ``blocks`` = ((diffusers block prefix, {module inside the block:
    original module}, original block name), ...), tried in order; ``top`` = {module outside the blocks:
    original module}. Modules of a block that map to one original module are its fused parts, in the table's
    order (their output rows). -> (key, parts), or None when the original checkpoint has no such module."""
    for head, table, original in blocks:
        if name.startswith(head):
            index, _, inner = name[len(head):].partition(".")
            if not index.isdigit() or inner not in table:
                return None
            parts = tuple(f"{head}{index}.{k}" for k, v in table.items() if v == table[inner])
            return f"{original}_{index}_{table[inner]}", parts
    return (top[name], (name,)) if name in top else None


def unmappable(names: list[str], family: str) -> list[str]:
    keys = keymap(family)
    return [n for n in names if keys.module(n) is None]


def loader_drops(names: list[str], family: str) -> list[str]:
    return keymap(family).drops(names)


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_kohya(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
             out_features: dict[str, int], family: str) -> dict[str, torch.Tensor]:
    """Per-module factors (A [r, in], B [out, r]) of the delta ``scale * B A`` -> kohya tensors.
    ``out_features`` gives the output size of every module (parts of a fused layer without adapter)."""
    keys = keymap(family)
    bad = unmappable(list(layers), family)
    if bad:
        raise KeyError(f"no kohya counterpart in the {family} checkpoint for {bad[:4]}")
    groups: dict[str, tuple[str, ...]] = {}
    for name in layers:
        key, parts = keys.module(name)
        groups.setdefault(key, parts)
    out = {}
    for key, parts in groups.items():
        ref = next(layers[p][0] for p in parts if p in layers)
        downs = [layers[p][0] for p in parts if p in layers]
        ups = [layers[p][1] if p in layers else ref.new_zeros(out_features[p], 0) for p in parts]
        down, up = torch.cat(downs, dim=0), torch.block_diag(*ups)
        rank, alpha = down.shape[0], down.shape[0] * scale
        if keys.folded(key):
            up, alpha = up * scale, float(rank)
        if keys.swapped(key, out_features):
            up = swap_halves(up)
        out[f"{PREFIX}{key}.lora_down.weight"] = down.contiguous()
        out[f"{PREFIX}{key}.lora_up.weight"] = up.contiguous()
        # fp32 whatever the weights' dtype: an fp16 alpha would round the scale (22.627 -> 22.625).
        out[f"{PREFIX}{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def is_kohya(keys) -> bool:
    return any(k.endswith(".lora_down.weight") for k in keys)


def _split(down, up, parts, sizes, hint):
    """Factors of each part of a fused adapter: blocks of the block-diagonal structure when ``up`` has
    it (our own files), else the shared ``down`` for every part with its rows of ``up`` (sd-scripts'
    default on fused layers). Both are exact. Parts whose rows are all zero and not in ``hint`` are
    left out (they contribute nothing)."""
    rows = dict(zip(parts, up.split(sizes, dim=0)))
    used = [p for p in parts if (hint is not None and p in hint) or rows[p].any()] or list(parts)
    rank = down.shape[0]
    if rank % len(used) == 0:
        r = rank // len(used)
        off_block = [rows[p].clone().index_fill_(1, torch.arange(i * r, (i + 1) * r), 0) for i, p in enumerate(used)]
        if not any(o.any() for o in off_block):
            return {p: (down[i * r:(i + 1) * r], rows[p][:, i * r:(i + 1) * r]) for i, p in enumerate(used)}
    return {p: (down, rows[p]) for p in used}


def kohya_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI also reads 'diffusion_model.<original module>.lora_down.weight': the same adapters under the
    checkpoint's dotted names. Bring them to the lora_unet_ form."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"diffusion_model\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)", key)
        out[f"{PREFIX}{m.group(1).replace('.', '_')}.{m.group(2)}" if m else key] = value
    return out


def from_kohya(state: dict[str, torch.Tensor], out_features: dict[str, int], family: str,
               hint: set[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya tensors -> {diffusers module: (A, B, scale)} with delta = scale * B A, exact.

    ``out_features`` lists the model's Linear modules (names and output sizes); ``hint`` the modules
    the file says it adapts (our own files), which keeps an untrained all-zero part in place."""
    keys = keymap(family)
    state = kohya_names(state)
    known = {}
    for name in out_features:
        mapped = keys.module(name)
        if mapped:
            known[mapped[0]] = mapped[1]
    bases = sorted(k[len(PREFIX):-len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight"))
    stray = [k for k in state if not k.startswith(PREFIX)]
    missing = [b for b in bases if b not in known]
    if stray or missing:
        raise KeyError(f"keys this {family} model has no module for: {(stray + missing)[:4]}")
    out = {}
    for base in bases:
        down = state[f"{PREFIX}{base}.lora_down.weight"].float()
        up = state[f"{PREFIX}{base}.lora_up.weight"].float()
        alpha_key = f"{PREFIX}{base}.alpha"
        scale = float(state[alpha_key]) / down.shape[0] if alpha_key in state else 1.0
        if keys.swapped(base, out_features):
            up = swap_halves(up)
        parts = known[base]
        split = _split(down, up, parts, [out_features[p] for p in parts], hint)
        out.update({p: (a, b, scale) for p, (a, b) in split.items()})
    return out


def read(state, metadata, out_features, hint, family) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The comfyui format's reader (formats.py): from_kohya with our files' list of adapted modules."""
    return from_kohya(state, out_features, family, hint)
