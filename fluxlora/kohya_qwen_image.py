"""Qwen-Image's kohya / ComfyUI names: ``lora_unet_<diffusers module, dots as underscores>``.

Qwen released Qwen-Image in diffusers' layout, and ComfyUI's own Qwen-Image model (comfy/ldm/qwen_image/model.py)
keeps those module names (``transformer_blocks.0.attn.to_q``, ``img_mlp.net.0.proj``, ``img_mod.1``,
``norm_out.linear``, ``time_text_embed.timestep_embedder.linear_1``, ``img_in``, ``txt_in``, ``proj_out``), so
its generic rule (comfy/lora.py ``model_lora_keys_unet``: ``lora_unet_<name, dots as underscores>`` applies to
``diffusion_model.<name>.weight``) applies every key of this file. Nothing is fused (q, k, v are separate
layers there too), nothing swapped (ComfyUI's final layer splits its modulation as (scale, shift), as
diffusers' ``AdaLayerNormContinuous`` does) and no scale folded.

diffusers' reader of such files (``_convert_non_diffusers_qwen_lora_to_diffusers``, diffusers 0.42) turns the
underscores back into dots inside ``transformer_blocks`` (keeping ``to_q``, ``add_q_proj``, ``img_mlp``,
``txt_mod``... whole) and maps the six modules outside the blocks listed in ``TOP`` explicitly: it reads every
key this map writes, so ``drops`` has nothing to report for it.
"""

from __future__ import annotations

BLOCKS = "transformer_blocks."
INNER = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
         "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
         "txt_mlp.net.0.proj", "txt_mlp.net.2")
# The Linear modules outside the blocks: the ones diffusers' reader maps by name (its top_level_modules).
TOP = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.timestep_embedder.linear_2")


def original_module(name: str) -> tuple[str, tuple[str, ...]] | None:
    """diffusers module -> (kohya key, (the module,)), or None for a module neither reader knows."""
    if name.startswith(BLOCKS):
        index, _, inner = name[len(BLOCKS):].partition(".")
        if not index.isdigit() or inner not in INNER:
            return None
    elif name not in TOP:
        return None
    return name.replace(".", "_"), (name,)


class QwenImageKeys:
    """The key map (kohya.KeyMap) of the Qwen-Image family."""

    module = staticmethod(original_module)

    def swapped(self, key: str, out_features: dict[str, int]) -> bool:
        return False

    def folded(self, key: str) -> bool:
        return False  # ComfyUI and diffusers' reader both apply alpha

    def drops(self, names: list[str]) -> list[str]:
        return []  # both readers apply every key of the map


KEYS = QwenImageKeys()
