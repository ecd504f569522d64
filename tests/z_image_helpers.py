"""Test helpers for Z-Image's kohya / ComfyUI files: the transformer's weights under the original checkpoint's
names (fused ``attention.qkv``, ``attention.out``, ``x_embedder``, ``final_layer``), built with our key map
(kohya_z_image); a kohya file applied to them as ComfyUI applies one (``lora_unet_<checkpoint name, dots as
underscores>`` to ``<name>.weight``, comfy/lora.py ``model_lora_keys_unet``); and the result brought back by
diffusers' own single-file converter (``convert_z_image_transformer_checkpoint_to_diffusers``)."""

from __future__ import annotations

import torch

from fluxlora import adapters, kohya
from fluxlora.kohya_z_image import original_module

# diffusers' names of the non-Linear parameters -> the original checkpoint's (what the converter undoes)
RENAMES = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
           ".attention.norm_q.": ".attention.q_norm.", ".attention.norm_k.": ".attention.k_norm."}


def _dotted(key: str, ckpt_names: list[str]) -> str:
    """Our underscored key -> the checkpoint's dotted module (ComfyUI's rule, run backwards)."""
    for name in ckpt_names:
        if name.replace(".", "_") == key:
            return name
    raise KeyError(f"ComfyUI would not apply {key!r}: no checkpoint module of that name")


def original_checkpoint(model) -> dict[str, torch.Tensor]:
    """The transformer's state dict under the original names, Linear layers fused by our key map."""
    sd, out_features = model.state_dict(), adapters.linear_out_features(model)
    linear = {f"{n}.{w}" for n in out_features for w in ("weight", "bias")}
    ckpt = {}
    for key, value in sd.items():
        if key not in linear:
            for new, old in RENAMES.items():
                key = key.replace(new, old)
            ckpt[key] = value
    modules = {}
    for name in out_features:
        key, parts = original_module(name)
        modules[key] = parts
    names = _original_dotted(modules)
    for key, parts in modules.items():
        for what in ("weight", "bias"):
            if f"{parts[0]}.{what}" in sd:
                ckpt[f"{names[key]}.{what}"] = torch.cat([sd[f"{p}.{what}"] for p in parts])
    return ckpt


def _original_dotted(modules: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Our underscored keys -> dotted original names (the diffusers part's name with the original leaf)."""
    out = {}
    for key, parts in modules.items():
        name = parts[0] + "."
        for new, old in RENAMES.items():
            name = name.replace(new, old)
        name = name[:-1].replace(".attention.to_q", ".attention.qkv").replace(".attention.to_out.0", ".attention.out")
        assert name.replace(".", "_") == key, (key, name)
        out[key] = name
    return out


def comfy_apply(ckpt: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W += alpha / rank * up @ down for every adapter of the file, found by ComfyUI's name rule."""
    names = [k[:-len(".weight")] for k in ckpt if k.endswith(".weight")]
    out = dict(ckpt)
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        base = key[len(kohya.PREFIX):-len(".lora_down.weight")]
        down, up = lora[key].float(), lora[f"{kohya.PREFIX}{base}.lora_up.weight"].float()
        alpha = float(lora[f"{kohya.PREFIX}{base}.alpha"])
        w = f"{_dotted(base, names)}.weight"
        out[w] = out[w] + alpha / down.shape[0] * up @ down
    return out


def to_diffusers(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(dict(ckpt))
