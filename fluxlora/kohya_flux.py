"""FLUX.1's kohya / ComfyUI names: the original BFL modules (``lora_unet_double_blocks_0_img_attn_qkv``).

BFL fuses layers that diffusers keeps apart: a double block's q, k, v (image and text stream) and a single
block's q, k, v and MLP input (``linear1``); kohya.py builds those fused adapters exactly. The mapping is
the one diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads (lora_conversion_utils.py, 0.42).
"""

from __future__ import annotations

from fluxlora.kohya import table_module

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
    return table_module(name, (("single_transformer_blocks.", SINGLE, "single_blocks"),
                               ("transformer_blocks.", DOUBLE, "double_blocks")), TOP)


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


class FluxKeys:
    """The key map (kohya.KeyMap) of the FLUX family."""

    module = staticmethod(bfl_module)
    drops = staticmethod(loader_drops)

    def swapped(self, key: str, out_features: dict[str, int]) -> bool:
        return key == SWAPPED

    def folded(self, key: str) -> bool:
        return key in FOLDED


KEYS = FluxKeys()
