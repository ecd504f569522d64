"""The run-config sections that measure the arms rather than train them: the held-out validation loss
(fluxlora/validation.py) and the subject metrics of the samples (fluxlora/subject_metrics.py). Imports no
torch."""

from __future__ import annotations

from pydantic import Field

from fluxlora.config_base import Section


class ValidationConfig(Section):
    """Held-out validation loss (fluxlora/validation.py): scored at every sample step on fixed tuples."""

    holdout: int = Field(0, ge=0, description="instance images kept out of training and scored instead "
                         "(spread evenly over the folder's name order)")
    dir: str | None = Field(None, description="a folder of held-out subject images (+ captions): scored, "
                            "never trained")
    prior_prompts: list[str] = Field(default_factory=list, description="prompts without the subject: how far "
                                     "each arm moved the model on them (val_loss_prior)")
    sigmas: int = Field(8, ge=1, le=64, description="noise levels per item, spread evenly over the schedule")


class MetricsConfig(Section):
    """Subject metrics of the sample images (fluxlora/subject_metrics.py), the DreamBooth paper's three."""

    subject: bool = Field(False, description="score every sample step's images: DINO and CLIP-I similarity to "
                          "the instance images, CLIP-T to their prompt (models loaded once; off by default)")
    dino: str = Field("facebook/dinov2-small", description="DINO / DINOv2 image model: a local path or hub id")
    clip: str = Field("openai/clip-vit-base-patch32", description="CLIP model and processor: a local path or "
                      "hub id")
