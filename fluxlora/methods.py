"""The init-method table: what each method's init reads and what it produces. Torch-free (the config reads
the names and capabilities); the trainer and the adapter code dispatch on these fields, never on a method's
name, so a new method touches only its own module and one row here. Math: docs/methods.md.

- ``needs``: what the init reads. WEIGHTS: the layer's weight only (``fn(W, rank, scale, generator=,
  niter=) -> inits.InitResult``, one layer at a time). The data-driven kinds read a per-layer statistic of a
  pass over the first ``adapter.sb_batches`` training micro-batches, on the pristine base before the adapter
  exists, run by initpass.py in memory-bounded chunks and shared by the run's arms of the same kind; the
  method's ``layer_init(layer, stat, rank, scale, lr1, gen) -> (tensors, stats)`` turns one layer's statistic into
  its factors and ``initpass.write`` copies them in once the layers exist. GRADIENTS: the training loss's
  gradient wrt the target weight (lora_sb, lora_ga, lora_one). ACTIVATIONS: the layer's inputs, forward only,
  as ``activations.Moments`` (mean and centred second moment; eva, corda_ipm). PRIOR_ACTIVATIONS: the same
  moments over the prior-preservation (class) rows of those micro-batches alone (``corda.prior_activation_pass``;
  corda_kpm), the knowledge to keep; a config without prior preservation is refused (config.py).
- ``start``: what the init's product B0 A0 is. ZERO: B0 A0 = 0, a plain LoRA, step 0 is the base. OFFSET:
  B0 A0 != 0, cancelled by a frozen second adapter (docs/methods.md section 6), step 0 is the base, the
  export carries both halves (rank 2r). WHOLE: the init is part of the trained delta by design (step 0 is
  not the base), exported as one rank-r LoRA.
- ``layer``: the adapted layer's kind. LORA: peft's LoRA layer (A, B). PAIR: A, B plus the frozen init
  term (A0, -B0) run as one rank-2r branch (offset_layers.py; every OFFSET method). CORE: a LoRA-XS layer
  B R A with frozen A, B and a trainable r x r core R (lora_sb.py).
- ``fixed_scale``: a method whose scale is part of the method (lora_sb: 1): alpha / scaling do not apply.
- ``check``: ``fn(images, batches, batch_size, init_from, repeats)``, run before any model loads.
- ``min_rank``: the smallest rank the method is defined for (checked by the config).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

WEIGHTS, GRADIENTS, ACTIVATIONS = "weights", "gradients", "activations"
PRIOR_ACTIVATIONS = "prior_activations"
ZERO, OFFSET, WHOLE = "zero", "offset", "whole"
LORA, PAIR, CORE = "lora", "pair", "core"
# What each data pass reads, and its name (for messages): the passes themselves are train.stat_passes.
PASSES = {GRADIENTS: ("the training data's loss gradient", "gradient pass"),
          ACTIVATIONS: ("the training data's layer inputs", "activation pass"),
          PRIOR_ACTIVATIONS: ("the prior-preservation (class) images' layer inputs", "prior activation pass")}
LAYER_KINDS = {LORA: "fluxlora.adapters:PeftLayers", PAIR: "fluxlora.offset_layers:OffsetLayers",
               CORE: "fluxlora.lora_sb:CoreLayers"}


@dataclass(frozen=True)
class Method:
    name: str
    needs: str
    start: str
    layer: str
    impl: str  # "module:function" of the init (a data-driven init: initpass:write, the writer of layer_fn's factors)
    layer_fn: str | None = None  # data-driven inits: "module:function" of one layer's factors (initpass.py)
    fixed_scale: float | None = None
    check: str | None = None  # "module:function" of its data check
    min_rank: int = 1
    min_rank_why: str = ""

    def init_fn(self):
        return _load(self.impl)

    def layer_init_fn(self):
        return _load(self.layer_fn)

    def check_fn(self):
        return _load(self.check) if self.check else None

    def layer_kind(self):
        """The object that attaches, detaches, freezes and exports this kind of layer."""
        return _load(LAYER_KINDS[self.layer])


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _weight(name: str, start: str, **kw) -> Method:
    return Method(name, WEIGHTS, start, PAIR if start == OFFSET else LORA, f"fluxlora.inits:{name}", **kw)


def _data(name: str, needs: str, start: str, layer: str, **kw) -> Method:
    """A data-driven init: its module ``fluxlora.<name>`` has ``layer_init`` (initpass.py's per-layer step)."""
    return Method(name, needs, start, layer, "fluxlora.initpass:write", layer_fn=f"fluxlora.{name}:layer_init", **kw)


METHODS = {m.name: m for m in (
    _weight("lora", ZERO),
    _weight("lora_gaussian", ZERO),
    _weight("pissa", OFFSET),
    _weight("pissa_fast", OFFSET),
    _weight("loram", OFFSET, min_rank=2, min_rank_why="its gain Q = ln r / ln min(n, m) is 0 at r = 1, so both "
            "factors would be zero (a dead adapter)"),
    _weight("olora", OFFSET),
    _weight("milora", OFFSET),
    _data("lora_sb", GRADIENTS, WHOLE, CORE, fixed_scale=1.0, check="fluxlora.lora_sb:check_data"),
    _data("lora_ga", GRADIENTS, OFFSET, PAIR),
    _data("lora_one", GRADIENTS, WHOLE, LORA),
    _data("eva", ACTIVATIONS, ZERO, LORA),
    _data("corda_ipm", ACTIVATIONS, OFFSET, PAIR),
    _data("corda_kpm", PRIOR_ACTIVATIONS, OFFSET, PAIR),
)}


def get(name: str) -> Method:
    from fluxlora.errors import AdapterError

    if name not in METHODS:
        raise AdapterError(f"unknown adapter.init {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]
