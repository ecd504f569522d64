"""Preparation keeps the big pieces of a pipeline apart on the accelerator (DESIGN decision 4)."""

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

    from fluxlora.families import flux

    load = flux.load_pipeline

    def load_and_name(*a, **k):
        pipe = load(*a, **k)
        for key in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            names[id(getattr(pipe, key))] = key
        return pipe

    monkeypatch.setattr(flux, "load_pipeline", load_and_name)
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    assert names and not overlaps, overlaps
    assert {names[i] for i in on_device} == {"transformer"}  # what the loop needs, nothing else
    assert prep.prior is not None and len(list((tmp_path / "class").glob("*.png"))) == 1
