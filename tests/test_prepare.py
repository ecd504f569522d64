"""Preparation keeps the big pieces of a pipeline apart on the accelerator (docs/design.md decision 4)."""

from __future__ import annotations

import torch

from conftest import tiny_config


def test_text_encoders_and_transformer_never_share_the_accelerator(tmp_path, tiny_flux, subject_dir, monkeypatch):
    """Placement is simulated on the CPU: moves requested with the run's torch.device count as 'on the
    accelerator', moves to the string 'cpu' as back on the CPU (the code uses exactly these two forms)."""
    from fluxlora.prepare import prepare

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir,
                      data={"instance_dir": str(subject_dir), "resolution": 32, "class_prompt": "a blue square",
                            "class_dir": str(tmp_path / "class"), "num_class_images": 1})
    on_device: set[int] = set()
    names: dict[int, str] = {}
    overlaps: list[set[str]] = []
    original = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        if id(module) in names and args:
            (on_device.add if isinstance(args[0], torch.device) else on_device.discard)(id(module))
            here = {names[i] for i in on_device}
            if "transformer" in here and here & {"text_encoder", "text_encoder_2"}:
                overlaps.append(here)
        return original(module, *args, **kwargs)

    from fluxlora import modelpath

    load = modelpath.load_base

    def load_and_name(*a, **k):
        pipe = load(*a, **k)
        for key in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            names[id(getattr(pipe, key))] = key
        return pipe

    monkeypatch.setattr(modelpath, "load_base", load_and_name)
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    assert names and not overlaps, overlaps
    assert {names[i] for i in on_device} == {"transformer"}  # what the loop needs, nothing else
    assert prep.prior is not None and len(list((tmp_path / "class").glob("*.png"))) == 1


def test_offload_base_moves_the_denoiser_off_for_every_decode_and_back(tmp_path, tiny_flux, subject_dir,
                                                                       monkeypatch):
    """sample.offload_base: simulated as above (a torch.device move = onto the accelerator, 'cpu' = off).
    Every VAE decode of a sample batch finds the denoiser off the accelerator, every denoiser forward finds
    it on, and the samples and the adapter are bit-identical to a run without offloading."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import load_file

    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    def config(name, offload):
        return tiny_config(tmp_path, tiny_flux, subject_dir, name=name,
                           sample={"every": 1, "steps": 2, "seeds": [0, 1], "offload_base": offload,
                                   "prompts": ["a zxq emblem on a red background, center", "a zxq emblem"]})

    run(config("plain", False), warn=lambda m: None)
    on_accelerator, events = {"denoiser": False}, []
    original_to, decode, forward = torch.nn.Module.to, AutoencoderKL.decode, FluxTransformer2DModel.forward

    def recording_to(module, *args, **kwargs):
        if isinstance(module, FluxTransformer2DModel) and args:
            on_accelerator["denoiser"] = isinstance(args[0], torch.device)
        return original_to(module, *args, **kwargs)

    def recording_decode(self, *args, **kwargs):
        events.append(("decode", on_accelerator["denoiser"]))
        return decode(self, *args, **kwargs)

    def recording_forward(self, *args, **kwargs):
        events.append(("denoise", on_accelerator["denoiser"]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    monkeypatch.setattr(AutoencoderKL, "decode", recording_decode)
    monkeypatch.setattr(FluxTransformer2DModel, "forward", recording_forward)
    run(config("offload", True), warn=lambda m: None)
    decodes = [on for kind, on in events if kind == "decode"]
    assert len(decodes) == 3 * 2  # steps 0, 1, 2 x two prompts (one batch of both seeds each)
    assert not any(decodes), events
    assert all(on for kind, on in events if kind == "denoise"), events
    plain, offload = GroupDir(tmp_path / "runs" / "plain").arm("lora"), GroupDir(tmp_path / "runs" / "offload").arm("lora")
    a, b = sorted(plain.samples_dir.rglob("*.png")), sorted(offload.samples_dir.rglob("*.png"))
    assert len(a) == len(b) >= 3 * 2 * 2 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    wa, wb = load_file(str(plain.adapter_file)), load_file(str(offload.adapter_file))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_offload_base_is_refused_for_quantized_bases():
    import pytest

    from fluxlora.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="sample.offload_base is for unquantized bases"):
        parse_config({"name": "t", "model": {"path": "toy", "quantize": "int8"}, "data": {"instance_dir": "."},
                      "sample": {"offload_base": True}})
