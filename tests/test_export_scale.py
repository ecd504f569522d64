"""Exports that are right in loaders that ignore the file's alpha: the diffusers file carries the scale in
its factors (alpha = rank), so B @ A alone is the trained delta."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import tiny_config


def test_the_diffusers_file_is_exact_with_the_scale_forced_to_one(tmp_path, tiny_flux, subject_dir):
    from fluxlora import adapters, export, lorafile, modelpath
    from fluxlora.families.flux import FAMILY as flux
    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "pissa"], "rank": 4,
                                                                 "scaling": "lora_alpha"},
                      train={"steps": 2, "lr": 1.0e-2})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    out_features = adapters.linear_out_features(modelpath.load_base(flux, str(tiny_flux), "fp32", None, "none")
                                                .transformer)
    for arm_name in ("lora", "pissa"):
        arm = GroupDir(tmp_path / "runs" / "tiny").arm(arm_name)
        path = arm.export_file("diffusers")
        meta = export.read_metadata(path)
        scale = meta["scale"]
        assert scale == 8.0 and meta["folded_scale"] == scale  # lora_alpha: C / sqrt(r) = 16 / 2
        config = meta["lora_config"]
        assert config["transformer.lora_alpha"] == config["transformer.r"]  # the config says scale 1
        raw = load_file(str(path))
        trained = lorafile.read(str(arm.export_file("comfyui")), out_features).layers  # the other writer
        for name, (a, b, s) in trained.items():
            ignoring_alpha = raw[f"transformer.{name}.lora_B.weight"] @ raw[f"transformer.{name}.lora_A.weight"]
            torch.testing.assert_close(ignoring_alpha, s * b @ a, rtol=1e-5, atol=1e-6)
