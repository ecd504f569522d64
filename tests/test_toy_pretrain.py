"""`fluxlora toy pretrain`: every stage runs, the result is a diffusers pipeline, an interrupted run resumes
to exactly the weights of an uninterrupted one, a snapshot assembles the latest checkpoint, the T5 lr is
its own, and the object-cell loss weight covers every object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxlora.toy import pretrain as P
from fluxlora.toy import world

TINY = dict(vae_steps=2, transformer_steps=4, batch=2, pool=16, seed=0, object_weight=10.0, save_every=2)


def test_pretrain_writes_a_loadable_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from fluxlora.families.flux import FAMILY as flux

    out = tmp_path / "base"
    P.pretrain(out, tmp_path / "work", **TINY)
    assert not (tmp_path / "base.tmp").exists()
    assert (out / "fluxlora_toy.json").exists()
    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.vae.config.shift_factor != 0.0  # latent statistics written into the VAE config
    emb = flux.encode_prompts(pipe, ["a large red circle on a blue background, center"], 24)
    neg = flux.encode_prompts(pipe, [""], 24)
    (image,) = flux.generate(pipe, emb, neg, [0], resolution=64, steps=2, guidance=3.5, true_cfg=4.0)
    assert np.asarray(image).shape == (64, 64, 3)


def one_group(ckpt):
    """Rewrite a transformer checkpoint as the older layout wrote it: one optimizer group for all."""
    state = torch.load(ckpt, weights_only=False)
    groups = state["opt"]["param_groups"]
    merged = {k: v for k, v in groups[0].items() if k != "peak"}
    merged["params"] = [i for g in groups for i in g["params"]]
    state["opt"]["param_groups"] = [merged]
    torch.save(state, ckpt)


@pytest.mark.parametrize("older_checkpoint", [False, True])
def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch, older_checkpoint):
    """Also from a checkpoint of the one-group optimizer layout, and a snapshot between saves works."""
    P.pretrain(tmp_path / "full", tmp_path / "full.work", **TINY)

    calls, real = {"n": 0}, P.flow_loss

    def interrupt_at_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "flow_loss", interrupt_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain(tmp_path / "cut", tmp_path / "cut.work", **TINY)
    assert torch.load(tmp_path / "cut.work" / "transformer.pt", weights_only=False)["step"] == 2
    assert P.snapshot(tmp_path / "snap", tmp_path / "cut.work") == 2
    if older_checkpoint:
        one_group(tmp_path / "cut.work" / "transformer.pt")
    monkeypatch.setattr(P, "flow_loss", real)
    P.pretrain(tmp_path / "cut", tmp_path / "cut.work", **TINY)
    log = (tmp_path / "cut.work" / "pretrain.log").read_text()
    assert "transformer resumed at step 2/4" in log
    from safetensors.torch import load_file

    for part in ("transformer", "text_encoder_2", "vae"):
        (a,) = (tmp_path / "full" / part).glob("*.safetensors")
        (b,) = (tmp_path / "cut" / part).glob("*.safetensors")
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part


def test_snapshot_assembles_the_checkpoint_and_t5_lr_is_its_own(tmp_path):
    """With the T5 lr at 0 the T5 weights stay the skeleton's; a snapshot of the finished work folder
    holds exactly the weights the run assembled."""
    from safetensors.torch import load_file

    from fluxlora.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="transformer.pt"):
        P.snapshot(tmp_path / "snap", tmp_path / "work")
    P.pretrain(tmp_path / "full", tmp_path / "work", **{**TINY, "lr": 5e-4, "t5_lr": 0.0})
    assert P.snapshot(tmp_path / "snap", tmp_path / "work") == TINY["transformer_steps"]
    for part in ("transformer", "text_encoder_2", "vae"):
        (a,) = (tmp_path / "full" / part).glob("*.safetensors")
        (b,) = (tmp_path / "snap" / part).glob("*.safetensors")
        wa, wb = load_file(a), load_file(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part
    (a,) = (tmp_path / "work" / "skeleton" / "text_encoder_2").glob("*.safetensors")
    (b,) = (tmp_path / "full" / "text_encoder_2").glob("*.safetensors")
    wa, wb = load_file(a), load_file(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    state = torch.load(tmp_path / "work" / "transformer.pt", weights_only=False)
    assert [g["peak"] for g in state["opt"]["param_groups"]] == [5e-4, 0.0]


@pytest.mark.parametrize("size", list(world.SIZES))
def test_object_weight_covers_every_object(size):
    """The weighted tokens (from the caption's position only) contain every pixel of the object."""
    masks = P.cell_token_masks(16, 16)
    for i, pos in enumerate(world.POSITIONS):
        for shape in world.SHAPES:
            cy, cx = world.position_center(pos, 64)
            cover = world.shape_mask(shape, cy, cx, world.SIZES[size] * 64, 64)
            per_token = cover.reshape(8, 8, 8, 8).sum(axis=(1, 3)).reshape(-1)  # 8x8 px per packed token
            assert per_token.sum() > 0
            assert (per_token[masks[i].numpy() == 0] == 0).all(), (pos, shape, size)
    assert masks.sum(1).max() < 64 / 3  # the object cell stays a minority of the tokens


def test_cli_passes_only_the_recipe_flags_given(monkeypatch, tmp_path):
    from fluxlora import cli
    from fluxlora.toy import pretrain as pretrain_module

    calls = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda out, work, **kw: calls.append((out, work, kw)))
    assert cli.main(["toy", "pretrain", "--out", str(tmp_path / "m"), "--lr", "2e-4", "--object-weight", "5",
                     "--transformer-steps", "8000", "--t5-lr", "1e-4"]) == 0
    out, work, kw = calls[0]
    assert work == tmp_path / "m.work"
    assert kw == {"threads": None, "device": "cpu", "transformer_steps": 8000, "lr": 2e-4, "t5_lr": 1e-4,
                  "object_weight": 5.0}


def test_cli_snapshot_trains_nothing(monkeypatch, tmp_path, capsys):
    from fluxlora import cli
    from fluxlora.toy import pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **kw: pytest.fail("trained"))
    monkeypatch.setattr(pretrain_module, "snapshot", lambda out, work: 3000 if work == tmp_path / "w" else -1)
    assert cli.main(["toy", "pretrain", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w"),
                     "--snapshot"]) == 0
    assert "transformer step 3000" in capsys.readouterr().out
    assert cli.main(["toy", "pretrain", "--out", str(tmp_path / "m"), "--snapshot", "--lr", "1e-3"]) == 2
    assert "drop lr" in capsys.readouterr().err


def test_progress_estimates_the_time_left_from_this_invocation():
    # 600 s for 2000 steps -> 0.3 s/step; 6000 steps left -> 30 min
    assert P.progress(600.0, 2000, 6000) == "600s, ~30 min left"
    assert P.progress(5.0, 0, 10) == "5s, ~1 min left"  # no step done yet: no division by zero
