"""End-to-end invariants of the trainer on a tiny FLUX pipeline built from configs (CPU, offline)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from family_helpers import FLUX, flux_predict, generate_one
from conftest import assert_resume_matches_uninterrupted, tiny_config
from fluxlora.rundir import GroupDir
from fluxlora.runner import run


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items(), key=lambda kv: kv[0].replace(".base_layer", "")):
        if "lora_" not in name:
            h.update(name.replace(".base_layer", "").encode())  # peft wraps targets in base_layer
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_smoke_run_writes_exact_file_set(tmp_path, tiny_flux, subject_dir):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir)
    results = run(cfg, warn=lambda m: None)
    assert results[0]["method"] == "lora" and "error" not in results[0]
    root = tmp_path / "runs" / "tiny"
    assert files_under(root) == [
        "config.yaml", "group.json",
        "lora/adapter.safetensors", "lora/adapter_comfyui.safetensors",
        "lora/checkpoints/step-000002/adapter.safetensors",
        "lora/checkpoints/step-000002/state.json",
        "lora/checkpoints/step-000002/trainer.pt",
        "lora/init.json", "lora/metrics.jsonl",
        "lora/samples/step-000000/00.png", "lora/samples/step-000000/grid.png",
        "lora/samples/step-000000/meta.json",
        "lora/samples/step-000002/00.png", "lora/samples/step-000002/grid.png",
        "lora/samples/step-000002/meta.json",
        "lora/status.json",
    ]
    group = GroupDir(root)
    assert group.info()["status"] == "done"
    arm = group.arm("lora")
    assert arm.status()["status"] == "done" and arm.status()["step"] == 2
    records = arm.metrics()
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in records)


def test_same_config_gives_same_numbers(tmp_path, tiny_flux, subject_dir):
    losses = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": 3})
        run(cfg, warn=lambda m: None)
        losses.append([r["loss"] for r in GroupDir(tmp_path / "runs" / name).arm("lora").metrics()])
    assert losses[0] == losses[1]


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_flux, subject_dir):
    def cfg(name, steps):
        return tiny_config(tmp_path, tiny_flux, subject_dir, name=name, train={"steps": steps, "checkpoint_every": 2})

    assert_resume_matches_uninterrupted(tmp_path, cfg, "lora")
    steps = [r["step"] for r in GroupDir(tmp_path / "runs" / "part").arm("lora").metrics()]
    assert steps == [1, 2, 3, 4]


def test_base_weights_untouched_and_step0_equals_base(tmp_path, tiny_flux, subject_dir):
    from fluxlora import adapters
    from fluxlora.families.flux import image_ids

    pipe = FLUX.load(str(tiny_flux))
    model = pipe.transformer
    before = weights_hash(model)
    x = torch.randn(1, 16, 16)  # 16 tokens (8x8 latent, 2x2 packed) of 4 x 4 channels
    emb, pooled = torch.randn(1, 24, 64), torch.randn(1, 32)
    ids = image_ids(8, 8)
    sig = torch.tensor([0.5])
    with torch.no_grad():
        base_out = flux_predict(model, x, sig, emb, pooled, ids, 1.0)
    targets = adapters.find_targets(model, FLUX.target_presets["attn"])
    info = adapters.inject(model, "lora", 4, 1.0, targets, seed=0)
    with torch.no_grad():
        out0 = flux_predict(model, x, sig, emb, pooled, ids, 1.0)
    torch.testing.assert_close(out0, base_out, rtol=0, atol=1e-6)
    assert weights_hash(model) == before
    assert info.trainable_params == sum(2 * 4 * 32 for _ in targets)  # 32x32 layers: r (m + n)
    adapters.remove(model, info)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_export_reloaded_by_diffusers_reproduces_trained_model(tmp_path, tiny_flux, subject_dir):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 3, "lr": 1.0e-2})
    run(cfg, warn=lambda m: None)
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora")
    trained = np.asarray(__import__("PIL.Image").Image.open(arm.samples_dir / "step-000003" / "00.png"))
    base = np.asarray(__import__("PIL.Image").Image.open(arm.samples_dir / "step-000000" / "00.png"))
    assert np.abs(trained.astype(int) - base.astype(int)).max() > 0, "training changed nothing"
    pipe = FLUX.load(str(tiny_flux))
    pipe.load_lora_weights(str(arm.adapter_file))
    img = generate_one(FLUX, pipe, cfg.sample.prompts[0], 24)
    diff = np.abs(np.asarray(img).astype(int) - trained.astype(int)).max()
    assert diff <= 1, f"reloaded adapter differs from the trained model by {diff}/255"


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantized_base_trains_on_cpu(tmp_path, tiny_flux, subject_dir, quantize):
    """Samples at step 0 run in eval mode before training: nf4 once failed here (bitsandbytes' CPU repack)."""
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir,
                      model={"path": str(tiny_flux), "quantize": quantize, "max_sequence_length": 24})
    results = run(cfg, warn=lambda m: None)
    assert "error" not in results[0], results[0]
    assert np.isfinite(results[0]["final_loss"])


def test_prior_preservation_generates_class_images(tmp_path, tiny_flux, subject_dir):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir,
                      data={"instance_dir": str(subject_dir), "resolution": 32, "class_prompt": "a blue square",
                            "class_dir": str(tmp_path / "class"), "num_class_images": 2,
                            "prior_loss_weight": 0.5})
    results = run(cfg, warn=lambda m: None)
    assert "error" not in results[0], results[0]
    assert len(list((tmp_path / "class").glob("*.png"))) == 2


def test_existing_run_refused_without_resume(tmp_path, tiny_flux, subject_dir):
    from fluxlora.runner import RunError

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir)
    run(cfg, warn=lambda m: None)
    with pytest.raises(RunError, match="--resume"):
        run(cfg, warn=lambda m: None)


def test_cli_export_and_sample_use_the_run_folder(tmp_path, tiny_flux, subject_dir):
    from fluxlora import commands

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "loram"], "rank": 4},
                      train={"steps": 2})
    run(cfg, warn=lambda m: None)
    root = tmp_path / "runs" / "tiny"
    first = {a: load_file(str(root / a / "adapter.safetensors")) for a in ("lora", "loram")}
    (root / "loram" / "adapter.safetensors").unlink()
    assert commands.export(root, None) == 0
    for arm, tensors in first.items():
        again = load_file(str(root / arm / "adapter.safetensors"))
        assert again.keys() == tensors.keys()
        for k in tensors:
            torch.testing.assert_close(again[k], tensors[k], rtol=0, atol=0)
    from fluxlora.export import read_metadata

    meta = read_metadata(root / "loram" / "adapter.safetensors")
    assert (meta["method"], meta["rank"], meta["export_rank"]) == ("loram", 4, 8)
    assert meta["lora_config"]["transformer.r"] == 8 and meta["lora_config"]["transformer.lora_alpha"] == 8
    assert commands.info(root / "loram" / "adapter.safetensors") == 0
    out = tmp_path / "s.png"
    assert commands.sample(root, "a zxq emblem on a red background, center", 0, 2, "loram", str(out)) == 0
    assert out.exists()


def test_export_of_an_earlier_step_comes_from_its_checkpoint(tmp_path, tiny_flux, subject_dir):
    from fluxlora import commands
    from fluxlora.errors import RunError
    from fluxlora.rundir import GroupDir

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora", "pissa"], "rank": 4},
                      train={"steps": 4, "checkpoint_every": 2, "lr": 1.0e-2})
    run(cfg, warn=lambda m: None)
    root = tmp_path / "runs" / "tiny"
    arm = GroupDir(root).arm("pissa")
    assert arm.checkpoint_steps() == [2, 4]
    with pytest.raises(RunError, match=r"no checkpoint at step 3 \(it has: 2, 4\)"):
        commands.export(root, ["pissa"], step=3)
    assert not arm.exports_dir.exists()  # refused before anything was written
    assert commands.export(root, ["pissa"], step=4) == 0  # the last step: the same files as the final export
    final, at4 = load_file(str(arm.adapter_file)), load_file(str(arm.step_export(4).adapter_file))
    assert final.keys() == at4.keys() and all(torch.equal(final[k], at4[k]) for k in final)
    assert commands.export(root, ["pissa"], step=2) == 0
    at2 = load_file(str(arm.step_export(2).adapter_file))
    assert any(not torch.equal(at2[k], final[k]) for k in final)
    assert [(s, f) for s, f, _ in arm.step_exports()] == [(2, "diffusers"), (2, "comfyui"), (4, "diffusers"),
                                                          (4, "comfyui")]
    from fluxlora.export import read_metadata

    assert read_metadata(arm.step_export(2).adapter_file)["steps"] == 2
    assert not GroupDir(root).arm("lora").exports_dir.exists()  # --arm: only that arm


def test_tensorboard_mirror_of_metrics(tmp_path, tiny_flux, subject_dir):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2, "tensorboard": True})
    run(cfg, warn=lambda m: None)
    events = list((tmp_path / "runs" / "tiny" / "lora" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_second_training_on_a_locked_run_folder_is_refused(tmp_path, tiny_flux, subject_dir):
    import subprocess
    import sys

    from fluxlora.runner import RunError

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir)
    run(cfg, warn=lambda m: None)
    lock = tmp_path / "runs" / "tiny" / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(sleeper.pid))  # a live process holds the folder
        with pytest.raises(RunError, match=f"pid {sleeper.pid}"):
            run(cfg, resume=True, warn=lambda m: None)
    finally:
        sleeper.kill()
        sleeper.wait()
    warnings = []
    run(cfg, resume=True, warn=warnings.append)  # the holder is gone: stale lock taken over
    assert any("stale lock" in w for w in warnings) and not lock.exists()


def test_nonfinite_loss_is_not_applied_and_stops_the_arm(tmp_path, tiny_flux, subject_dir, monkeypatch):
    import fluxlora.train as T

    real = T.loss_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, rec = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 1 else loss), rec

    monkeypatch.setattr(T, "loss_step", poisoned)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 5, "max_bad_steps": 2})
    result = run(cfg, warn=lambda m: None)[0]
    assert "not finite for 2 consecutive steps (last at step 3)" in result["error"]
    arm = GroupDir(tmp_path / "runs" / "tiny").arm("lora")
    assert arm.status()["status"] == "failed"
    assert [r.get("skipped", False) for r in arm.metrics()] == [False, True, True]


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, tiny_flux, subject_dir, monkeypatch):
    import fluxlora.train as T

    full = tiny_config(tmp_path, tiny_flux, subject_dir, name="full", train={"steps": 4, "checkpoint_every": 0})
    run(full, warn=lambda m: None)
    real = T.make_batch

    def interrupt_at_step_2(prep, micro, *args, **kwargs):
        if micro == 2:
            raise KeyboardInterrupt
        return real(prep, micro, *args, **kwargs)

    cut = tiny_config(tmp_path, tiny_flux, subject_dir, name="cut", train={"steps": 4, "checkpoint_every": 0})
    monkeypatch.setattr(T, "make_batch", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(cut, warn=lambda m: None)
    arm = GroupDir(tmp_path / "runs" / "cut").arm("lora")
    assert arm.status()["status"] == "interrupted" and [p.name for p in arm.checkpoints()] == ["step-000002"]
    monkeypatch.setattr(T, "make_batch", real)
    run(cut, resume=True, warn=lambda m: None)
    a = load_file(str(tmp_path / "runs/full/lora/adapter.safetensors"))
    b = load_file(str(arm.adapter_file))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_clip_fraction_counts_the_steps_whose_gradient_was_clipped(tmp_path, tiny_flux, subject_dir):
    """Per step `clipped` in metrics.jsonl (grad_norm above train.max_grad_norm) and its share in the summary:
    an arm clipped on most steps trains at a smaller effective step than its lr says."""
    import fluxlora.train as T

    assert T.clipped(torch.tensor(2.0), 1.0) and not T.clipped(torch.tensor(0.5), 1.0) and not T.clipped(9.0, None)
    tight = tiny_config(tmp_path, tiny_flux, subject_dir, name="tight", train={"steps": 3, "max_grad_norm": 1e-6})
    loose = tiny_config(tmp_path, tiny_flux, subject_dir, name="loose", train={"steps": 3, "max_grad_norm": None})
    assert run(tight, warn=lambda m: None)[0]["clip_fraction"] == 1.0
    assert run(loose, warn=lambda m: None)[0]["clip_fraction"] == 0.0
    records = [r for r in GroupDir(tmp_path / "runs" / "tight").arm("lora").metrics() if "loss" in r]
    assert [r["clipped"] for r in records] == [True, True, True]
