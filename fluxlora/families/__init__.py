"""Model families, chosen by ``model.family``: the capability table (torch-free, read by the config) and
the lookup of each family's implementation of the written interface (families/interface.py)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    name: str
    objective: str  # "flow": flow matching, velocity target; "ddpm": noise / v target on a beta schedule
    quantizable: bool  # the denoiser's block Linear layers can be bitsandbytes int8 / nf4
    impl: str  # "module:attribute" of the object implementing families.interface.Family
    pixel_multiple: int  # image sides are multiples of this in the released models (VAE factor x patch)
    kohya_keys: str | None = None  # "module:attribute" of its kohya / ComfyUI key map (kohya.KeyMap)


SPECS = {
    "flux": FamilySpec("flux", "flow", True, "fluxlora.families.flux:FAMILY", 16, "fluxlora.kohya_flux:KEYS"),
    "flux2": FamilySpec("flux2", "flow", True, "fluxlora.families.flux2:FAMILY", 16, "fluxlora.kohya_flux2:KEYS"),
    "sd3": FamilySpec("sd3", "flow", True, "fluxlora.families.sd3:FAMILY", 16, "fluxlora.kohya_sd3:KEYS"),
    "sdxl": FamilySpec("sdxl", "ddpm", False, "fluxlora.families.unet:SDXL", 8, "fluxlora.kohya_unet:KEYS"),
    "sd15": FamilySpec("sd15", "ddpm", False, "fluxlora.families.unet:SD15", 8, "fluxlora.kohya_unet:KEYS"),
    "z_image": FamilySpec("z_image", "flow", True, "fluxlora.families.z_image:FAMILY", 16, "fluxlora.kohya_z_image:KEYS"),
    "qwen_image": FamilySpec("qwen_image", "flow", True, "fluxlora.families.qwen_image:FAMILY", 16, "fluxlora.kohya_qwen_image:KEYS"),
}
LOSS_WEIGHTINGS = {"flow": ("none", "sigma_sqrt", "cosmap"), "ddpm": ("none", "min_snr")}


def get(name: str):
    """The family object of ``name`` (imports torch and diffusers)."""
    module, _, attr = SPECS[name].impl.partition(":")
    return getattr(importlib.import_module(module), attr)
