"""Atomic save / exact resume of the full trainer state of one arm.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` written under a temporary name and renamed into
place once complete; ``state.json`` is written last, so a folder without it is never used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxlora import adapters
from fluxlora.errors import CheckpointError, write_errors
from fluxlora.rundir import ArmDir, step_name, write_json


def save(arm: ArmDir, step: int, model, optimizer, lr_scheduler, generator: torch.Generator,
         keep: int) -> Path:
    final = arm.checkpoints_dir / step_name(step)
    tmp = arm.checkpoints_dir / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(adapters.adapter_state(model), str(tmp / "adapter.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state()},
                   tmp / "trainer.pt")
        write_json(tmp / "state.json", {"step": step})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e} -> the previous checkpoint is "
                              "kept; free disk space and resume with --resume") from e
    for old in arm.checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in arm.checkpoints_dir.glob(".tmp-*"):  # left by a killed save; the run lock makes us the
        shutil.rmtree(partial, ignore_errors=True)      # only writer, so none of them is in progress
    return final


def find(arm: ArmDir, resume: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint of the arm (None when there is none); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        done = arm.checkpoints()
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise CheckpointError(f"train.resume {resume!r} is not a complete checkpoint folder (no "
                              "state.json) -> fix: use 'latest' or a checkpoints/step-NNNNNN folder")
    return path


def load(path: Path, model, optimizer, lr_scheduler, generator: torch.Generator) -> dict:
    import json

    adapters.load_adapter_state(model, load_file(str(path / "adapter.safetensors")))
    state = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return json.loads((path / "state.json").read_text())
