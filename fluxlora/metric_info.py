"""What each logged metric means and which direction is better: one table read by the summary legend, the
sweep report and the web UI. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    higher_is_better: bool | None  # None: a reference value (the base model's), not a score
    label: str

    @property
    def arrow(self) -> str:
        return {True: "higher is better", False: "lower is better", None: "reference"}[self.higher_is_better]


METRICS: dict[str, Metric] = {
    "loss": Metric(False, "training loss"),
    "final_loss": Metric(False, "training loss at the last step"),
    "val_loss_subject": Metric(False, "held-out subject loss (data.validation)"),
    "val_loss_subject_base": Metric(None, "held-out subject loss of the base model"),
    "val_loss_prior": Metric(False, "change of the prediction on prior prompts (forgetting)"),
    "subject_fidelity": Metric(True, "toy: how well samples show the subject (exact detector)"),
    "prompt_fidelity": Metric(True, "toy: share of samples that honour the prompt's background and place"),
    "prior_accuracy": Metric(True, "toy: world prompts drawn correctly"),
    "prior_accuracy_base": Metric(None, "toy: world prompts drawn correctly by the base model"),
    "prior_drift_px": Metric(False, "toy: mean pixel change of world images against the base"),
    "dino": Metric(True, "DINOv2 similarity of samples to the instance images"),
    "clip_i": Metric(True, "CLIP image similarity of samples to the instance images"),
    "clip_t": Metric(True, "CLIP similarity of samples to their prompts"),
}


def scores(keys) -> list[str]:
    """The keys that are scores (known, with a direction), in the table's order."""
    keys = set(keys)
    return [k for k, m in METRICS.items() if k in keys and m.higher_is_better is not None]


def better(name: str, a: float, b: float) -> bool:
    """Whether value ``a`` of metric ``name`` is better than ``b``."""
    return a > b if METRICS[name].higher_is_better else a < b
