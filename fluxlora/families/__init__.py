"""Model families: one module each, the same small set of functions, chosen by ``model.family``."""

from fluxlora.families import flux, sd3
from fluxlora.families.unet import SD15, SDXL

FAMILIES = {"flux": flux, "sd3": sd3, "sdxl": SDXL, "sd15": SD15}
