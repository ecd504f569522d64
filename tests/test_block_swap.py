"""Block swap (fluxlora/block_swap.py, train.blocks_to_swap): the same training bit for bit, the weights of a
swapped block present exactly while it runs (forward, backward, recomputation) and one swapped block on the
device at a time, every weight back and no hook left after an arm, also after an error, and the refusals.

On the CPU the "device" and the host are one: an offloaded weight's data is an empty placeholder there, so a use
while it is out fails loudly, and a move in makes a fresh copy whose lifetime the tests can watch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing.reductions import StorageWeakRef

from conftest import tiny_config
from family_helpers import FLUX, flux_predict
from fluxlora import adapters, arms, block_swap
from fluxlora.config_errors import ConfigError
from fluxlora.families.flux import image_ids
from fluxlora.prepare import prepare
from fluxlora.rundir import GroupDir
from fluxlora.runner import open_group, run
from test_train import weights_hash

CPU = torch.device("cpu")
# A weight-reading init (our offset layer: frozen factors in the blocks) and a data-pass one; with checkpointing
# peft's layer (the passes run before checkpointing is on).
RUN_ARMS = {False: ["pissa", "lora_ga"], True: ["lora"]}


def base_params(block) -> list[torch.nn.Parameter]:
    return [p for n, p in block.named_parameters() if "lora_" not in n]


def n_resident(blocks) -> int:
    """Swapped blocks whose base weights are on the device (not placeholders), read from the weights."""
    return sum(any(p.numel() > 0 for p in base_params(b)) for b in blocks)


def arm_outputs(root, arm: str) -> dict:
    """An arm's exported adapter tensors, logged losses and sample image bytes."""
    d = GroupDir(root).arm(arm)
    records = list(map(json.loads, d.metrics_file.read_text().splitlines()))
    losses = [r["loss"] for r in records if "loss" in r]
    held_out = [{k: v for k, v in r.items() if k.startswith("val_loss")} for r in records if "val_loss_subject" in r]
    images = {str(p.relative_to(d.samples_dir)): p.read_bytes() for p in sorted(d.samples_dir.rglob("*.png"))}
    return {"adapter": load_file(str(d.adapter_file)), "losses": losses, "images": images, "held_out": held_out}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_swapped_run_is_bit_identical(tmp_path, tiny_flux, subject_dir, checkpointing):
    """Both blocks of the tiny FLUX swapped: the same adapters, losses, samples (step 0 and 3, sampled with
    the swap active; with checkpointing also offload_base's round trip of the denoiser during decode) and
    held-out losses (the base's reference scores run before any arm, through block_swap.resident); lora_ga's
    gradient pass runs with the swap's hooks on."""
    out, arms = {}, RUN_ARMS[checkpointing]
    for n in (0, 2):
        cfg = tiny_config(tmp_path, tiny_flux, subject_dir, name=f"n{n}", adapter={"init": arms, "rank": 4},
                          train={"steps": 3, "blocks_to_swap": n, "gradient_checkpointing": checkpointing},
                          sample={"offload_base": checkpointing}, data={"validation": {"holdout": 1, "sigmas": 2}})
        assert all("error" not in r for r in run(cfg, warn=lambda m: None))
        out[n] = {arm: arm_outputs(tmp_path / "runs" / f"n{n}", arm) for arm in arms}
    for arm in arms:
        a, b = out[0][arm], out[2][arm]
        assert a["adapter"].keys() == b["adapter"].keys()
        assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"]), arm
        assert a["losses"] == b["losses"] and len(a["losses"]) == 3, arm
        assert a["images"] == b["images"], arm
        assert a["held_out"] == b["held_out"] and len(a["held_out"]) == 2, arm
        assert {k.split("/")[0] for k in a["images"]} == {"step-000000", "step-000003"}


def model_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 16, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 24, 64, generator=g),
            torch.randn(2, 32, generator=g), image_ids(8, 8))


def watch_linears(blocks, seen: list) -> list:
    """Hooks on every base Linear of the swapped blocks: at its forward and just before its backward, its
    weight must be there and at most one swapped block on the device."""
    def check(layer, when):
        seen.append((when, layer.weight.numel() > 0, n_resident(blocks)))

    def forward(layer, args, out):
        check(layer, "forward")
        if out.requires_grad:
            out.register_hook(lambda g, layer=layer: check(layer, "backward"))
    return [m.register_forward_hook(forward) for b in blocks for n, m in b.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in n]


@pytest.mark.parametrize("checkpointing", [None, "early_stop", "whole"])
def test_weights_are_present_exactly_while_a_block_runs(tiny_flux, checkpointing):
    """With checkpointing "whole", the recomputation runs each block's forward to its end (torch stops it early
    by default): the forward hook then runs inside the block's own backward, which must not take it out."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    model = FLUX.load(str(tiny_flux)).transformer
    adapters.inject(model, "pissa", 4, 1.0, adapters.find_targets(model, FLUX.target_presets["attn"]), seed=0)
    if checkpointing:
        model.enable_gradient_checkpointing()
    with block_swap.swapping(model, 2, CPU) as swap:
        blocks, seen = block_swap.swapped_blocks(model, 2), []
        moved = sum(p.numel() * p.element_size() for b in swap.blocks for p in b.host)
        handles = watch_linears(blocks, seen)
        adapter = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}
        copies = []  # each block's device copies, taken right after its move in
        handles += [b.register_forward_pre_hook(lambda m, a: copies.extend(
            StorageWeakRef(p.untyped_storage()) for p in base_params(m))) for b in blocks]
        with torch.no_grad():
            flux_predict(model, *model_inputs(), 1.0)
        assert n_resident(blocks) == 0 and swap.bytes_in == moved
        with set_checkpoint_early_stop(checkpointing != "whole"):
            out = flux_predict(model, *model_inputs(), 1.0)
        # Only the saved-tensor hook lets the forward's copies go before backward (linear saves W^T).
        assert n_resident(blocks) == 0 and copies and all(c.expired() for c in copies)
        out.pow(2).mean().backward()
        assert n_resident(blocks) == 0  # the backward's end took the last held block out
        assert swap.bytes_in == 3 * moved  # in for the forward and once for the backward, recomputation or not
        assert adapter == {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" in n}  # never moved
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
        for h in handles:
            h.remove()
    kinds = {when for when, _, _ in seen}
    assert kinds == {"forward", "backward"}
    assert all(present and resident == 1 for _, present, resident in seen), seen


def arm_state(model) -> dict:
    """What an arm must leave as it found: the weights (values, tensors, devices) and the hooks."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    return {"hash": weights_hash(model), "hooks": hooks, "devices": {p.device for p in model.parameters()},
            "tensors": [p.data_ptr() for p in model.parameters()],
            "saved_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False)}


def test_after_an_arm_everything_is_back_also_after_an_error(tmp_path, tiny_flux, subject_dir):
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, train={"steps": 2, "blocks_to_swap": 2})
    prep = prepare(cfg, CPU, warn=lambda m: None)
    model, before = prep.model, arm_state(prep.model)
    assert before["saved_hooks"] is None
    group = open_group(cfg, resume=False, warn=lambda m: None)
    assert arms.train_arm(prep, cfg, "lora", group.arm("lora"))["final_loss"] is not None
    assert arm_state(model) == before
    # An error in the middle of a training backward: after the single block came in for it, before the
    # double block did. Still everything back.
    resident = []

    def boom(grad):
        resident.append(n_resident(block_swap.swapped_blocks(model, 2)))
        raise RuntimeError("boom")

    def fail(module, args, out):  # registered before the swap's hooks: runs before its move in
        if torch.is_grad_enabled():
            out[0].register_hook(boom)
    handle = model.transformer_blocks[0].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        arms.train_arm(prep, cfg, "lora", group.arm("lora"))
    handle.remove()
    assert resident == [1] and arm_state(model) == before


def test_refusals(tmp_path, tiny_flux, subject_dir):
    for model in ({"quantize": "int8"}, {"quantize": "nf4"}, {"family": "sdxl"}, {"family": "sd15"}):
        with pytest.raises(ConfigError, match="blocks_to_swap"):
            tiny_config(tmp_path, tiny_flux, subject_dir, model={"path": str(tiny_flux), **model},
                        train={"blocks_to_swap": 1})
    model = FLUX.load(str(tiny_flux)).transformer
    with pytest.raises(ConfigError, match="has 2 blocks"):
        block_swap.swapped_blocks(model, 3)
    assert block_swap.swapped_blocks(model, 1) == [model.single_transformer_blocks[0]]  # the last one
    int8 = FLUX.load(str(tiny_flux), quantize="int8").transformer
    before = weights_hash(int8)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        with block_swap.swapping(int8, 1, CPU):
            pass
    assert weights_hash(int8) == before


def test_a_swapped_weight_fails_loudly_when_used_outside_its_block(tiny_flux):
    model = FLUX.load(str(tiny_flux)).transformer
    layer = model.single_transformer_blocks[0].proj_out
    with block_swap.swapping(model, 1, CPU) as swap:
        assert layer.weight.numel() == 0
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, layer.in_features))
        with swap.readable():  # host copies, hooks paused
            assert layer.weight.numel() == layer.in_features * layer.out_features


def test_benchmark_tiny_mode(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import block_swap as bench

    assert bench.main(["--tiny", "--steps", "1", "--warmup", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "s/it" not in line]
    assert len(rows) == 3 and all(line.count("|") == 7 for line in rows), rows
