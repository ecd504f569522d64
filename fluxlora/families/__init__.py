"""Model families: one module each, the same small set of functions, chosen by ``model.family``."""

from fluxlora.families import flux

FAMILIES = {"flux": flux}
