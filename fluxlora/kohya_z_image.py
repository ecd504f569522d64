"""Z-Image's kohya / ComfyUI names: the modules of Tongyi's original checkpoint
(``lora_unet_layers_0_attention_qkv``), under which ComfyUI loads Z-Image (its NextDiT with
``z_image_modulation``) and applies every ``lora_unet_<name, dots as underscores>`` key.

The original attention fuses q, k, v into one ``attention.qkv`` (rows q, k, v; kohya.py builds that adapter
exactly) and calls the output ``attention.out``; the feed-forward (``w1``, ``w2``, ``w3``) and the blocks'
``adaLN_modulation.0`` keep diffusers' names. Outside the blocks diffusers renames ``x_embedder`` and
``final_layer`` (``all_x_embedder.2-1``, ``all_final_layer.2-1``). These are the renames diffusers' single-file
converter undoes (``convert_z_image_transformer_checkpoint_to_diffusers``, diffusers 0.42): tests check our
table against it. Nothing is swapped (the row orders agree) and no scale is folded.

diffusers' kohya reader for Z-Image (``_convert_non_diffusers_z_image_lora_to_diffusers``) reads the blocks,
``t_embedder`` and ``cap_embedder`` of this file, but not ``x_embedder`` and ``final_layer`` (it expects
diffusers' names there): ``drops`` says so.
"""

from __future__ import annotations

from fluxlora.kohya import table_module

BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
INNER = {  # diffusers module inside a block -> original module; parts of one fused module in row order
    "attention.to_q": "attention_qkv", "attention.to_k": "attention_qkv", "attention.to_v": "attention_qkv",
    "attention.to_out.0": "attention_out",
    "feed_forward.w1": "feed_forward_w1", "feed_forward.w2": "feed_forward_w2", "feed_forward.w3": "feed_forward_w3",
    "adaLN_modulation.0": "adaLN_modulation_0",
}
TOP = {  # modules outside the blocks (patch size 2, frame patch 1: the released models' only one)
    "all_x_embedder.2-1": "x_embedder",
    "all_final_layer.2-1.linear": "final_layer_linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer_adaLN_modulation_1",
    "t_embedder.mlp.0": "t_embedder_mlp_0", "t_embedder.mlp.2": "t_embedder_mlp_2",
    "cap_embedder.1": "cap_embedder_1",
}
MISREAD = ("all_x_embedder.", "all_final_layer.")  # diffusers' kohya reader loses these


def original_module(name: str) -> tuple[str, tuple[str, ...]] | None:
    """diffusers module -> (original key, the diffusers modules fused in it, in row order), or None."""
    return table_module(name, tuple((head, INNER, head[:-1]) for head in BLOCKS), TOP)


class ZImageKeys:
    """The key map (kohya.KeyMap) of the Z-Image family."""

    module = staticmethod(original_module)

    def swapped(self, key: str, out_features: dict[str, int]) -> bool:
        return False

    def folded(self, key: str) -> bool:
        return False  # ComfyUI and diffusers' reader both apply alpha

    def drops(self, names: list[str]) -> list[str]:
        lost = [n for n in names if n.startswith(MISREAD)]
        if not lost:
            return []
        return [f"adapter_comfyui.safetensors: diffusers' kohya reader does not read the adapters of "
                f"{', '.join(lost[:4])} (it expects diffusers' names there) -> in diffusers load "
                "adapter.safetensors instead (ComfyUI applies them all)"]


KEYS = ZImageKeys()
