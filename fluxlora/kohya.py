"""The kohya / ComfyUI key format of FLUX.1 LoRA files, both ways, exactly.

kohya's sd-scripts, ComfyUI and Forge name adapters after the original BFL modules
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) and apply
``alpha / rank * up @ down`` to that module's weight. BFL fuses layers that diffusers keeps apart: a
double block's q, k, v (image and text stream) and a single block's q, k, v and MLP input (``linear1``).
Separate adapters (A_i, B_i) on those parts are one adapter on the fused layer with

    down = [A_1; A_2; ...]        (ranks summed)
    up   = blockdiag(B_1, B_2, ...)   (a part without adapter contributes zero rows)

so ``up @ down`` stacks B_i A_i along the output: the exact fused delta, no approximation. The mapping is
the one diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads (lora_conversion_utils.py, 0.42).
"""

from __future__ import annotations

import re

import torch

PREFIX = "lora_unet_"
# diffusers module inside transformer_blocks.{i} -> BFL module inside double_blocks_{i}. Parts of one
# fused BFL module are listed in the order of its output rows.
DOUBLE = {
    "attn.to_q": "img_attn_qkv", "attn.to_k": "img_attn_qkv", "attn.to_v": "img_attn_qkv",
    "attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.add_q_proj": "txt_attn_qkv", "attn.add_k_proj": "txt_attn_qkv", "attn.add_v_proj": "txt_attn_qkv",
    "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
SINGLE = {  # inside single_transformer_blocks.{i} -> inside single_blocks_{i}
    "attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1", "proj_mlp": "linear1",
    "proj_out": "linear2", "norm.linear": "modulation_lin",
}
TOP = {  # modules outside the blocks
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear",
}
# BFL's last layer computes (shift, scale) where diffusers' AdaLayerNormContinuous computes (scale, shift):
# the two halves of that layer's output rows swap.
SWAPPED = "final_layer_adaLN_modulation_1"
# diffusers' converter reads the final layer without its alpha (scale 1): there the scale goes into
# `up` and alpha = rank, which every loader reads the same way.
FOLDED = ("final_layer_linear", "final_layer_adaLN_modulation_1")


def bfl_module(name: str) -> tuple[str, tuple[str, ...]] | None:
    """diffusers module name -> (BFL module key, the diffusers modules fused in it, in row order);
    None when the module has no BFL counterpart."""
    for head, table, bfl in (("single_transformer_blocks.", SINGLE, "single_blocks"),
                             ("transformer_blocks.", DOUBLE, "double_blocks")):
        if name.startswith(head):
            index, _, inner = name[len(head):].partition(".")
            if not index.isdigit() or inner not in table:
                return None
            parts = tuple(f"{head}{index}.{k}" for k, v in table.items() if v == table[inner])
            return f"{bfl}_{index}_{table[inner]}", parts
    if name in TOP:
        return TOP[name], (name,)
    return None


def unmappable(names: list[str]) -> list[str]:
    return [n for n in names if bfl_module(n) is None]


BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
FINAL = ("proj_out", "norm_out.linear")


def loader_drops(names: list[str]) -> list[str]:
    """Warnings for the ComfyUI-format file: diffusers' kohya reader (load_lora_weights on this file) keeps only
    the blocks; sd-scripts' inference network builds the blocks and the input embedders, not the final layer.
    ComfyUI applies every key."""
    outside = [n for n in names if not n.startswith(BLOCKS)]
    final = [n for n in names if n in FINAL]
    out = []
    if outside:
        out.append(f"adapter_comfyui.safetensors: diffusers' kohya reader drops the {len(outside)} adapted layer(s) "
                   f"outside the blocks ({', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}) -> in "
                   "diffusers load adapter.safetensors instead (ComfyUI applies them all)")
    if final:
        out.append(f"adapter_comfyui.safetensors: sd-scripts' loader skips the final layer ({', '.join(final)}) "
                   "-> use the file in ComfyUI, or adapter.safetensors in diffusers, where it applies")
    return out


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_kohya(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
             out_features: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per-module factors (A [r, in], B [out, r]) of the delta ``scale * B A`` -> kohya tensors.
    ``out_features`` gives the output size of every module (parts of a fused layer without adapter)."""
    bad = unmappable(list(layers))
    if bad:
        raise KeyError(f"no kohya/BFL counterpart for {bad[:4]}")
    groups: dict[str, tuple[str, ...]] = {}
    for name in layers:
        key, parts = bfl_module(name)
        groups.setdefault(key, parts)
    out = {}
    for key, parts in groups.items():
        ref = next(layers[p][0] for p in parts if p in layers)
        downs = [layers[p][0] for p in parts if p in layers]
        ups = [layers[p][1] if p in layers else ref.new_zeros(out_features[p], 0) for p in parts]
        down, up = torch.cat(downs, dim=0), torch.block_diag(*ups)
        rank, alpha = down.shape[0], down.shape[0] * scale
        if key in FOLDED:
            up, alpha = up * scale, float(rank)
        if key == SWAPPED:
            up = _swap_halves(up)
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


def _kohya_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI also reads 'diffusion_model.<BFL module>.lora_down.weight': the same adapters under BFL's
    dotted names. Bring them to the lora_unet_ form."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"diffusion_model\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        out[f"{PREFIX}{m.group(1).replace('.', '_')}.{m.group(2)}" if m else key] = value
    return out


def from_kohya(state: dict[str, torch.Tensor], out_features: dict[str, int],
               hint: set[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya tensors -> {diffusers module: (A, B, scale)} with delta = scale * B A, exact.

    ``out_features`` lists the model's Linear modules (names and output sizes); ``hint`` the modules
    the file says it adapts (our own files), which keeps an untrained all-zero part in place."""
    state = _kohya_names(state)
    known = {}
    for name in out_features:
        mapped = bfl_module(name)
        if mapped:
            known[mapped[0]] = mapped[1]
    bases = sorted(k[len(PREFIX):-len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight"))
    stray = [k for k in state if not k.startswith(PREFIX)]
    missing = [b for b in bases if b not in known]
    if stray or missing:
        raise KeyError(f"keys this FLUX transformer has no module for: {(stray + missing)[:4]}")
    out = {}
    for base in bases:
        down = state[f"{PREFIX}{base}.lora_down.weight"].float()
        up = state[f"{PREFIX}{base}.lora_up.weight"].float()
        alpha_key = f"{PREFIX}{base}.alpha"
        scale = float(state[alpha_key]) / down.shape[0] if alpha_key in state else 1.0
        if base == SWAPPED:
            up = _swap_halves(up)
        parts = known[base]
        split = _split(down, up, parts, [out_features[p] for p in parts], hint)
        out.update({p: (a, b, scale) for p, (a, b) in split.items()})
    return out


def read(state, metadata, out_features, hint=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The comfyui format's reader (formats.py): from_kohya with our files' list of adapted modules."""
    return from_kohya(state, out_features, hint)
