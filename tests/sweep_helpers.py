"""Shared by the sweep and study tests: a finished arm written without training, and a validation section."""

from __future__ import annotations

from fluxlora.rundir import GroupDir

VALIDATION = {"holdout": 1, "prior_prompts": ["a large red circle on a white background, center"], "sigmas": 2}


def fake_arm(group: GroupDir, arm: str, records: list[dict], final_loss: float) -> None:
    a = group.arm(arm).create()
    for r in records:
        a.log_metrics(r)
    a.set_status("done", summary={"arm": arm, "final_loss": final_loss})
