"""Test helpers for kohya / ComfyUI files of SD3: Stability's MMDiT checkpoint of a diffusers SD3
transformer, a kohya file applied to it the way ComfyUI applies one, and the result brought back to diffusers
by diffusers' own single-file converter (``convert_sd3_transformer_checkpoint_to_diffusers``).

ComfyUI keeps a checkpoint's own module names and applies ``lora_unet_<name, dots as underscores>`` to
``<name>.weight`` (comfy/lora.py, ``model_lora_keys_unet``): ``comfy_apply`` does the same here."""

from __future__ import annotations

import torch

from fluxlora import adapters, kohya
from fluxlora.kohya_sd3 import mmdit_module


def mmdit_names(num_blocks: int) -> dict[str, str]:
    """Every Linear module of Stability's MMDiT, underscored -> dotted."""
    out = ["context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
           "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for i in range(num_blocks):
        for stream in ("x_block", "context_block"):
            for m in ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                out.append(f"joint_blocks.{i}.{stream}.{m}")
    return {d.replace(".", "_"): d for d in out}


def mmdit_checkpoint(model) -> dict[str, torch.Tensor]:
    """The transformer's weights under Stability's names, fused and swapped by our key map (kohya_sd3)."""
    sd, out_features = model.state_dict(), adapters.linear_out_features(model)
    names, keys = mmdit_names(len(model.transformer_blocks)), kohya.keymap("sd3")
    ckpt = {"pos_embed": sd["pos_embed.pos_embed"], "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
            "x_embedder.proj.bias": sd["pos_embed.proj.bias"]}
    for name in out_features:
        key, parts = mmdit_module(name)
        for what in ("weight", "bias"):
            t = torch.cat([sd[f"{p}.{what}"] for p in parts if p in out_features])
            ckpt[f"{names[key]}.{what}"] = kohya.swap_halves(t) if keys.swapped(key, out_features) else t
    return ckpt


def comfy_apply(ckpt: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], num_blocks: int) -> dict:
    """W += alpha / rank * up @ down for every adapter of the file, found by ComfyUI's name rule."""
    names, out = mmdit_names(num_blocks), dict(ckpt)
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        base = key[len(kohya.PREFIX):-len(".lora_down.weight")]
        down, up = lora[key].float(), lora[f"{kohya.PREFIX}{base}.lora_up.weight"].float()
        alpha = float(lora[f"{kohya.PREFIX}{base}.alpha"])
        w = f"{names[base]}.weight"  # a KeyError here: a key ComfyUI would not apply
        out[w] = out[w] + alpha / down.shape[0] * up @ down
    return out


def to_diffusers(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt))
