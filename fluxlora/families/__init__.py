"""Model families: one module each, the same small set of functions, chosen by ``model.family``."""

from fluxlora.families import flux, sd3

FAMILIES = {"flux": flux, "sd3": sd3}
