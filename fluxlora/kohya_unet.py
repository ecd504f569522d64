"""SDXL / SD 1.5's kohya / ComfyUI names: the diffusers UNet module with dots as underscores
(``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``), the form sd-scripts writes for
SD 1.x. ComfyUI maps these names onto its own UNet for SD 1.x and SDXL (``unet_to_diffusers``), and
diffusers' kohya reader (``_convert_non_diffusers_lora_to_diffusers``) reads them back: tests load our file
through it. No layer is fused, no scale folded, nothing swapped.
"""

from __future__ import annotations

# diffusers' kohya reader renames keys by string rules; SDXL's added-condition embedding comes out under a
# wrong name there (its adapters are silently lost; measured with diffusers 0.42, tests/test_kohya_families.py).
MISREAD = ("add_embedding.",)


def unet_module(name: str) -> tuple[str, tuple[str, ...]]:
    return name.replace(".", "_"), (name,)


class UNetKeys:
    """The key map (kohya.KeyMap) of the UNet families."""

    module = staticmethod(unet_module)

    def swapped(self, key: str, out_features: dict[str, int]) -> bool:
        return False

    def folded(self, key: str) -> bool:
        return False

    def drops(self, names: list[str]) -> list[str]:
        lost = [n for n in names if n.startswith(MISREAD)]
        if not lost:
            return []
        return [f"adapter_comfyui.safetensors: diffusers' kohya reader loses the adapters of {', '.join(lost[:4])} "
                "(it renames the added-condition embedding wrongly) -> in diffusers load adapter.safetensors "
                "instead (ComfyUI applies them all)"]


KEYS = UNetKeys()
