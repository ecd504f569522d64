"""Test helpers for Qwen-Image's kohya / ComfyUI files: a file applied to the transformer's weights as ComfyUI
applies it (comfy/lora.py ``model_lora_keys_unet``: ``lora_unet_<name, dots as underscores>`` patches
``diffusion_model.<name>.weight`` by ``alpha / rank * up @ down``; ComfyUI's Qwen-Image model keeps diffusers'
module names, so its weights are the diffusers state dict under the ``diffusion_model.`` prefix)."""

from __future__ import annotations

import torch

from fluxlora import kohya


def comfy_names(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """ComfyUI's key table of a model: lora_unet_<underscored name> -> diffusion_model.<name>.weight."""
    return {f"{kohya.PREFIX}{k[:-len('.weight')].replace('.', '_')}": f"diffusion_model.{k}"
            for k in sd if k.endswith(".weight")}


def comfy_apply(sd: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's state dict with every adapter of the kohya file merged in as ComfyUI merges it."""
    table, out = comfy_names(sd), {f"diffusion_model.{k}": v.clone() for k, v in sd.items()}
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        base = key[:-len(".lora_down.weight")]
        down, up = lora[key].float(), lora[f"{base}.lora_up.weight"].float()
        alpha = float(lora[f"{base}.alpha"])
        w = table[base]  # a KeyError here: a key ComfyUI would not apply
        out[w] = out[w] + alpha / down.shape[0] * up @ down
    return {k[len("diffusion_model."):]: v for k, v in out.items()}
