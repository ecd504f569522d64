"""FLUX.2's kohya / ComfyUI names: the modules of BFL's FLUX.2 checkpoint (``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_unet_single_blocks_0_linear1``, ``lora_unet_double_stream_modulation_img_lin``). ComfyUI keeps BFL's
names for the model, so every ``lora_unet_<module, dots as underscores>`` applies there.

BFL fuses a double block's q, k, v per stream (``img_attn.qkv``, ``txt_attn.qkv``); kohya.py builds those
fused adapters exactly. The single blocks' ``linear1`` / ``linear2`` are single diffusers modules already
(``attn.to_qkv_mlp_proj``, ``attn.to_out``). The names are the ones diffusers' single-file converter
(``convert_flux2_transformer_checkpoint_to_diffusers``) and kohya reader (``_convert_kohya_flux2_lora_to_diffusers``)
read, diffusers 0.42; the final ``adaLN_modulation.1`` holds (shift, scale) where diffusers has (scale, shift).
"""

from __future__ import annotations

from fluxlora.kohya import table_module

# diffusers module inside transformer_blocks.{i} -> BFL module inside double_blocks_{i}; parts of one fused
# BFL module in the order of its output rows.
DOUBLE = {
    "attn.to_q": "img_attn_qkv", "attn.to_k": "img_attn_qkv", "attn.to_v": "img_attn_qkv",
    "attn.to_out.0": "img_attn_proj", "ff.linear_in": "img_mlp_0", "ff.linear_out": "img_mlp_2",
    "attn.add_q_proj": "txt_attn_qkv", "attn.add_k_proj": "txt_attn_qkv", "attn.add_v_proj": "txt_attn_qkv",
    "attn.to_add_out": "txt_attn_proj", "ff_context.linear_in": "txt_mlp_0", "ff_context.linear_out": "txt_mlp_2",
}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # inside single_transformer_blocks.{i}
TOP = {  # modules outside the blocks (FLUX.2 modulates all blocks of a kind from one shared layer)
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img_lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt_lin",
    "single_stream_modulation.linear": "single_stream_modulation_lin",
    "norm_out.linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear",
}
SWAPPED = "final_layer_adaLN_modulation_1"
# What diffusers' kohya reader (load_lora_weights on the ComfyUI file) maps outside the blocks; it warns
# about and skips the other keys.
DIFFUSERS_READS = ("x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
                   "time_guidance_embed.timestep_embedder.linear_2", "proj_out")
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def bfl_module(name: str) -> tuple[str, tuple[str, ...]] | None:
    """diffusers module name -> (BFL module key, the diffusers modules fused in it, in row order);
    None when the module has no BFL counterpart."""
    return table_module(name, (("single_transformer_blocks.", SINGLE, "single_blocks"),
                               ("transformer_blocks.", DOUBLE, "double_blocks")), TOP)


def loader_drops(names: list[str]) -> list[str]:
    """Warnings for the ComfyUI-format file: diffusers' FLUX.2 kohya reader skips the shared modulation
    layers, the guidance embedder and the final norm (ComfyUI applies every key)."""
    lost = [n for n in names if not n.startswith(BLOCKS) and n not in DIFFUSERS_READS]
    if not lost:
        return []
    return [f"adapter_comfyui.safetensors: diffusers' kohya reader drops the {len(lost)} adapted layer(s) "
            f"{', '.join(lost[:4])}{', ...' if len(lost) > 4 else ''} -> in diffusers load adapter.safetensors "
            "instead (ComfyUI applies them all)"]


class Flux2Keys:
    """The key map (kohya.KeyMap) of the FLUX.2 family."""

    module = staticmethod(bfl_module)
    drops = staticmethod(loader_drops)

    def swapped(self, key: str, out_features: dict[str, int]) -> bool:
        return key == SWAPPED

    def folded(self, key: str) -> bool:
        return False  # every reader of these keys applies alpha


KEYS = Flux2Keys()
