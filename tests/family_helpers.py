"""Test helpers for calling a family's interface directly (families/interface.py)."""

from __future__ import annotations

from fluxlora.families.flux import FAMILY as FLUX
from fluxlora.families.interface import Cond


def flux_predict(model, x, sigmas, embeds, pooled, img_ids, guidance: float):
    """FLUX's velocity prediction from raw tensors (the conditioning a trainer batch would carry)."""
    return FLUX.predict(model, x, sigmas, Cond({"embeds": embeds, "pooled": pooled},
                                               {"img_ids": img_ids, "guidance": guidance}))


def generate_one(family, pipe, prompt: str, max_len: int, *, seed: int = 0, resolution: int = 32, steps: int = 2,
                 guidance: float = 3.5, true_cfg: float = 1.0, negative: str | None = None):
    """One image of ``prompt`` through the family's own pipeline call."""
    cond = family.encode_prompts(pipe, [prompt], max_len)
    neg = family.encode_prompts(pipe, [negative], max_len) if negative is not None else None
    return family.generate(pipe, cond, neg, [seed], resolution, steps, guidance, true_cfg)[0]


def other_base_start_inits(tested: list[str]) -> list[str]:
    """Every registered init not in ``tested`` whose step 0 is the base (methods.py start zero / offset): the
    ones that start after an init step (LoRA-SB, LoRA-One, start "whole") have their own tests, and so do the
    ones that read the prior-preservation images (corda_kpm: tests/test_corda.py; these runs have none)."""
    from fluxlora import methods

    return [m for m in methods.METHODS if m not in tested and methods.get(m).start != methods.WHOLE
            and methods.get(m).needs != methods.PRIOR_ACTIVATIONS]


def run_beside_lora(cfg, runs_dir, method: str, last_step: int):
    """Run ``cfg`` (arms lora and ``method``): both step-0 samples are the same image within 1/255 (both start
    at the base) and ``method``'s step-``last_step`` sample moved away from it; returns (its ArmDir, that
    sample as an int array)."""
    import numpy as np
    from PIL import Image

    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    def sample(arm, step: int):
        return np.asarray(Image.open(arm.samples_dir / f"step-{step:06d}" / "00.png")).astype(int)

    assert [r.get("error") for r in run(cfg, warn=lambda m: None)] == [None, None]
    group = GroupDir(runs_dir / cfg.name)
    first = [sample(a, 0) for a in group.arms()]
    assert np.abs(first[0] - first[1]).max() <= 1
    arm = group.arm(method)
    last = sample(arm, last_step)
    assert np.abs(last - first[1]).max() > 0
    return arm, last


def assert_generate_tab_reproduces_the_samples(group, prompt: str, steps: int, last: int) -> None:
    """The web UI's generator (bench.AdapterBench: one loaded base, the arms' exported adapters switched in)
    gives the base image of step 0 and each arm's image of step ``last``, within 1/255."""
    import numpy as np
    from PIL import Image

    from fluxlora.bench import AdapterBench

    for label, img in AdapterBench(group.root).side_by_side(prompt, 0, steps):
        arm = group.arms()[0] if label == "base" else group.arm(label)
        step = "step-000000" if label == "base" else f"step-{last:06d}"
        sample = np.asarray(Image.open(arm.samples_dir / step / "00.png")).astype(int)
        assert np.abs(np.asarray(img).astype(int) - sample).max() <= 1, label

