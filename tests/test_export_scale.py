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
        trained = lorafile.read(str(arm.export_file("comfyui")), out_features, "flux").layers  # the other writer
        for name, (a, b, s) in trained.items():
            ignoring_alpha = raw[f"transformer.{name}.lora_B.weight"] @ raw[f"transformer.{name}.lora_A.weight"]
            torch.testing.assert_close(ignoring_alpha, s * b @ a, rtol=1e-5, atol=1e-6)


def test_layers_a_known_loader_drops_are_named_with_the_file_to_use():
    from fluxlora.formats import loader_warnings

    blocks = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"]
    assert loader_warnings(["diffusers", "comfyui"], blocks, "flux") == []  # the presets stay inside the blocks
    lines = loader_warnings(["diffusers", "comfyui"], blocks + ["proj_out", "x_embedder"], "flux")
    assert len(lines) == 2
    assert "diffusers' kohya reader drops the 2 adapted layer(s) outside the blocks (proj_out, x_embedder)" in lines[0]
    assert "load adapter.safetensors instead" in lines[0]
    assert "sd-scripts' loader skips the final layer (proj_out)" in lines[1]
    assert loader_warnings(["diffusers"], ["proj_out"], "flux") == []  # the diffusers file loses nothing in diffusers


def test_a_run_targeting_the_final_layer_warns_before_training(tmp_path, tiny_flux, subject_dir):
    from fluxlora.runner import run

    said = []
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "pissa"], "rank": 2,
                                                                 "target_modules": ["to_q", "proj_out"]},
                      train={"steps": 1})
    run(cfg, warn=said.append)
    warnings = [s for s in said if s.startswith("warning: adapter_comfyui.safetensors")]
    assert len(warnings) == 2  # two loaders, said once for both arms


def near_cancelling(rank=4, n=48, m=40, seed=0):
    """An offset arm's export factors after a little training: [A; A0], [B, -B0] with A ~ A0, B ~ B0."""
    g = torch.Generator().manual_seed(seed)
    a0, b0 = torch.randn(rank, m, generator=g), torch.randn(n, rank, generator=g)
    a, b = a0 + 1e-3 * torch.randn(rank, m, generator=g), b0 + 1e-3 * torch.randn(n, rank, generator=g)
    return torch.cat([a, a0]), torch.cat([b, -b0], dim=1)


def test_balanced_factors_keep_the_delta_and_survive_a_bf16_cast():
    from fluxlora.export import balanced

    a, b = near_cancelling()
    (ba, bb), = balanced({"x": (a, b)}).values()
    delta = b.double() @ a.double()
    torch.testing.assert_close(bb.double() @ ba.double(), delta, rtol=1e-5, atol=1e-7)

    def bf16_error(fa, fb):
        return float((fb.bfloat16().double() @ fa.bfloat16().double() - delta).norm() / delta.norm())

    naive, kept = bf16_error(a, b), bf16_error(ba, bb)
    assert kept < 0.01 < naive and kept * 50 < naive  # the cast of the raw halves loses most of the delta


def test_bf16_export_of_an_offset_arm_is_as_exact_as_a_plain_loras(tmp_path, tiny_flux, subject_dir, capsys):
    import re

    from fluxlora import commands
    from fluxlora.runner import run

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "loram"], "rank": 4},
                      train={"steps": 6, "lr": 1.0e-3})
    run(cfg, warn=lambda m: None)
    capsys.readouterr()
    assert commands.export(tmp_path / "runs" / "tiny", None, ["diffusers", "comfyui"], "bf16", None) == 0
    out = capsys.readouterr().out
    worst = {(arm, f): float(e) for arm, f, e in
             re.findall(r"(\w+): (adapter\w*)\.safetensors: relative delta error .*worst layer ([0-9.e+-]+)", out)}
    assert len(worst) == 4, out
    for f in ("adapter", "adapter_comfyui"):
        assert worst[("loram", f)] <= 2 * worst[("lora", f)] and worst[("lora", f)] < 0.01
    from fluxlora import export

    meta = export.read_metadata(tmp_path / "runs" / "tiny" / "loram" / "adapter.safetensors")
    assert meta["refactored"] == "balanced" and meta["offset"] is False and meta["export_rank"] == 8
