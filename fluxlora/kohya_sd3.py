"""SD3 / SD3.5's kohya / ComfyUI names: the modules of Stability's MMDiT checkpoint
(``lora_unet_joint_blocks_0_x_block_attn_qkv``), as sd-scripts' SD3 LoRA writes them and ComfyUI reads them
(ComfyUI keeps Stability's names for the model: every ``lora_unet_<name, dots as underscores>`` applies).

The MMDiT fuses each stream's q, k, v into one ``attn.qkv`` (kohya.py builds that adapter exactly). The
names and the row order of the fused layers are those diffusers' single-file converter splits
(``convert_sd3_transformer_checkpoint_to_diffusers``, diffusers 0.42): tests check our table against it.
Two layers hold (shift, scale) where diffusers has (scale, shift): the final ``adaLN_modulation.1`` and the
context stream's in the last joint block, which has no context output (``context_pre_only``).
"""

from __future__ import annotations

from fluxlora.kohya import table_module

# diffusers module inside transformer_blocks.{i} -> MMDiT module inside joint_blocks.{i}; parts of one fused
# module in the order of its output rows.
JOINT = {
    "attn.to_q": "x_block_attn_qkv", "attn.to_k": "x_block_attn_qkv", "attn.to_v": "x_block_attn_qkv",
    "attn.to_out.0": "x_block_attn_proj",
    "attn2.to_q": "x_block_attn2_qkv", "attn2.to_k": "x_block_attn2_qkv", "attn2.to_v": "x_block_attn2_qkv",
    "attn2.to_out.0": "x_block_attn2_proj",
    "ff.net.0.proj": "x_block_mlp_fc1", "ff.net.2": "x_block_mlp_fc2", "norm1.linear": "x_block_adaLN_modulation_1",
    "attn.add_q_proj": "context_block_attn_qkv", "attn.add_k_proj": "context_block_attn_qkv",
    "attn.add_v_proj": "context_block_attn_qkv", "attn.to_add_out": "context_block_attn_proj",
    "ff_context.net.0.proj": "context_block_mlp_fc1", "ff_context.net.2": "context_block_mlp_fc2",
    "norm1_context.linear": "context_block_adaLN_modulation_1",
}
TOP = {  # modules outside the blocks
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder_mlp_0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder_mlp_2",
    "time_text_embed.text_embedder.linear_1": "y_embedder_mlp_0",
    "time_text_embed.text_embedder.linear_2": "y_embedder_mlp_2",
    "norm_out.linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear",
}
HEAD = "transformer_blocks."
FINAL_NORM = "final_layer_adaLN_modulation_1"
CONTEXT_NORM = "_context_block_adaLN_modulation_1"


def mmdit_module(name: str) -> tuple[str, tuple[str, ...]] | None:
    """diffusers module -> (MMDiT key, the diffusers modules fused in it, in row order), or None."""
    return table_module(name, ((HEAD, JOINT, "joint_blocks"),), TOP)


class SD3Keys:
    """The key map (kohya.KeyMap) of the SD3 family."""

    module = staticmethod(mmdit_module)

    def swapped(self, key: str, out_features: dict[str, int]) -> bool:
        if key == FINAL_NORM:
            return True
        if key.startswith("joint_blocks_") and key.endswith(CONTEXT_NORM):
            index = key[len("joint_blocks_"):-len(CONTEXT_NORM)]
            return f"{HEAD}{index}.attn.to_add_out" not in out_features  # the last block: context_pre_only
        return False

    def folded(self, key: str) -> bool:
        return False  # every known reader of this file applies alpha

    def drops(self, names: list[str]) -> list[str]:
        return []  # ComfyUI applies every key; diffusers has no reader for this file (it reads adapter.safetensors)


KEYS = SD3Keys()
