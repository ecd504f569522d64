"""Portable adapter files: diffusers/peft keys written by diffusers' own writer, LoRA config in the
metadata (so ``load_lora_weights`` restores alpha), plus fluxlora's own metadata. Written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxlora import adapters
from fluxlora.config import config_hash
from fluxlora.rundir import ArmDir

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
META_KEY = "fluxlora"


def write_diffusers(path: Path, state: dict, lora_config, meta: dict) -> None:
    """Write through FluxPipeline.save_lora_weights into a temp dir, add our metadata, rename in place."""
    from diffusers import FluxPipeline

    path = Path(path)
    config = lora_config.to_dict()
    config["init_lora_weights"] = True  # loaders must never re-run an init (ENV_NOTES)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name="a.safetensors",
                                       transformer_lora_adapter_metadata=config)
        with safe_open(os.path.join(tmp, "a.safetensors"), "pt") as f:
            metadata = dict(f.metadata() or {})
        metadata[META_KEY] = json.dumps(meta, sort_keys=True)
        final_tmp = os.path.join(tmp, "b.safetensors")
        save_file(load_file(os.path.join(tmp, "a.safetensors")), final_tmp, metadata=metadata)
        os.replace(final_tmp, path)


def export_arm(model, info: adapters.AdapterInfo, arm: ArmDir, cfg, method: str, steps: int) -> Path:
    """adapter.safetensors of the exact delta against the pristine base (rank 2r with an offset)."""
    state, lora_config = adapters.export_delta(model, info, EXPORT_DTYPES[cfg.export.dtype])
    meta = {
        "base_model": cfg.model.path, "family": cfg.model.family, "method": method,
        "rank": info.rank, "export_rank": lora_config.r, "scale": info.scale,
        "alpha": lora_config.lora_alpha, "trigger": cfg.data.instance_prompt, "steps": steps,
        "config_hash": config_hash(cfg),
    }
    write_diffusers(arm.adapter_file, state, lora_config, meta)
    return arm.adapter_file


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    out = {"lora_config": json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")}
    out.update(json.loads(metadata.get(META_KEY, "{}") or "{}"))
    return out
