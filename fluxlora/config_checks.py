"""Config checks that read several sections or the method / family tables (config.py's validators call them):
each raises ValueError with the fix, as every validator does. Imports no torch."""

from __future__ import annotations

from fluxlora import methods
from fluxlora.families import SPECS


def dora_layer_kinds(adapter) -> None:
    """DoRA (peft's use_dora) is a variant of peft's LoRA layer: refuse the arms of the other layer kinds
    (methods.py ``layer``), each with the reason of its kind."""
    kinds = {methods.METHODS[n].layer for n in adapter.arms} - {methods.LORA} if adapter.dora else set()
    if not kinds:
        return
    why = {methods.PAIR: "the offset pair layer's frozen init term (A0, -B0) has no place in peft's DoRA layer, "
                         "and DoRA's row norm of W + s B A would not cancel it: step 0 would not be the base",
           methods.CORE: "the LoRA-SB layer B R A trains an r x r core R between frozen B, A and has no DoRA "
                         "variant"}
    parts = [", ".join(n for n in adapter.arms if methods.METHODS[n].layer == k) + f" (layer kind {k!r}): " +
             why.get(k, "not peft's LoRA layer") for k in sorted(kinds)]
    ok = [n for n, m in methods.METHODS.items() if m.layer == methods.LORA]
    raise ValueError(f"adapter.dora is peft's DoRA, a variant of its LoRA layer; {'; '.join(parts)} -> fix: "
                     f"set adapter.dora: false, or keep only methods of peft's LoRA layer ({', '.join(ok)}) "
                     "in adapter.init")


def block_swap(cfg) -> None:
    """train.blocks_to_swap swaps the family table's blocks (the families quantize.py may quantize, by the
    same BLOCK_PREFIXES) and moves plain weights: bitsandbytes keeps its state outside them (block_swap.py)."""
    n, q = cfg.train.blocks_to_swap, cfg.model.quantize
    if n and not SPECS[cfg.model.family].quantizable:
        raise ValueError(f"train.blocks_to_swap {n}: the {cfg.model.family} UNet has no list of transformer "
                         "blocks to swap (and fits a 24 GB GPU without it) -> set train.blocks_to_swap: 0")
    if n and q != "none":
        raise ValueError(f"train.blocks_to_swap {n} moves plain weights, and a model.quantize {q} base keeps "
                         "state outside them (and fits without swapping) -> set train.blocks_to_swap: 0 or "
                         "model.quantize: none")


def prior_data(cfg) -> None:
    """An init that calibrates on the prior-preservation images (methods.py PRIOR_ACTIVATIONS: corda_kpm,
    docs/methods.md section 12) needs them: class images from data.class_dir or generated ones."""
    arms = [n for n in cfg.adapter.arms if methods.METHODS[n].needs == methods.PRIOR_ACTIVATIONS]
    d = cfg.data
    if arms and not (d.class_prompt and (d.class_dir or d.num_class_images)):
        raise ValueError(f"adapter.init {', '.join(arms)} calibrates on the prior-preservation (class) images, "
                         "and this config has no prior preservation -> set data.class_dir (a folder of class "
                         "images) and data.class_prompt, or data.num_class_images and data.class_prompt (to "
                         "generate them), or drop it from adapter.init")
