"""An existing LoRA file as per-module factors, for ``adapter.init_from``: ours or another trainer's, in
diffusers/peft keys or kohya/ComfyUI keys; and the check that it fits the arm it should start.

Every layer comes back as (A, B, s) with delta = s * B A on the diffusers module it adapts; fused BFL
layers (FLUX's qkv and linear1, SD3's qkv) are split exactly (kohya.from_kohya). The format is recognised through the format
table (formats.py). A DoRA file's per-row vectors come with the layers (``FileLayers.dora``): peft's magnitude
(diffusers keys) or ComfyUI's dora_scale (kohya keys), which adapters.load_factors turns into the arm's magnitude."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora.errors import AdapterError
from fluxlora.formats import FORMATS, Format

OURS = "fluxlora"  # our metadata record (export.META_KEY)
PEFT_META = "lora_adapter_metadata"  # diffusers' LoRA config record
# What a file's DoRA vector is (DoraVectors.rule): peft's magnitude m itself, or ComfyUI's dora_scale, which
# ComfyUI divides by the base weight's row norm (kohya_dora.py; docs/dora.md).
PEFT, COMFYUI = "peft", "comfyui"
MAGNITUDE_KEY = re.compile(r"(?:transformer\.|unet\.)?(.+)\.lora_magnitude_vector(?:\.weight)?")


@dataclass
class DoraVectors:
    """A DoRA file's vector per output row of each module (diffusers row order), and what it is (``rule``)."""

    rule: str
    vectors: dict[str, torch.Tensor]


class FileLayers(dict):
    """{module: (A, B, s)} as a format's reader gives them, with the file's DoRA vectors (None: no DoRA):
    one object, so that whoever passes a file's layers on (adapters.load_factors) passes its magnitudes too."""

    def __init__(self, layers: dict, dora: DoraVectors | None = None):
        super().__init__(layers)
        self.dora = dora


@dataclass
class LoraFile:
    path: Path
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A [r, in], B [out, r], s)
    offset: bool = False  # ours, exported with the frozen init term: the second half of each rank
    meta: dict = field(default_factory=dict)

    @property
    def dora(self) -> DoraVectors | None:
        return getattr(self.layers, "dora", None)

    @property
    def rank(self) -> int:
        """The trainable rank: the per-layer rank, halved for a file that carries the init term."""
        ranks = sorted({a.shape[0] for a, _, _ in self.layers.values()})
        if len(ranks) != 1:
            raise AdapterError(f"adapter.init_from {self.path}: its layers have different ranks {ranks}; "
                               "one arm trains one rank -> fix: re-export it at one rank (fluxlora export --rank)")
        return ranks[0] // 2 if self.offset else ranks[0]


def read(path: str | Path, out_features: dict[str, int], family: str) -> LoraFile:
    """Load ``path`` against a ``family`` model whose Linear modules (name -> output size) are
    ``out_features``."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for missing / non-safetensors files
        raise AdapterError(f"adapter.init_from {path}: not a readable safetensors file ({e})") from e
    ours = json.loads(metadata.get(OURS, "{}") or "{}")
    fmt = file_format(state)
    hint = set(ours["targets"]) if "targets" in ours else None
    try:
        layers = fmt.fn("read")(state, metadata, out_features, hint, family)
    except KeyError as e:
        raise AdapterError(f"adapter.init_from {path}: {e.args[0]} -> fix: use a LoRA file made for this "
                           f"{family} model (its denoiser only, no text encoder)") from e
    try:
        dora = fmt.fn("dora")(state, out_features, layers, family) if fmt.dora else None
    except KeyError as e:
        raise AdapterError(f"adapter.init_from {path}: {e.args[0]}") from e
    if not layers:
        raise AdapterError(f"adapter.init_from {path}: no LoRA tensors found (lora_A/lora_B or lora_down/lora_up)")
    return LoraFile(path, FileLayers(layers, dora), bool(ours.get("offset", False)), ours)


def file_format(state: dict) -> Format:
    """The format (formats.py) that recognises the file's keys, else the one that reads everything else."""
    detected = [f for f in FORMATS.values() if f.detect and f.fn("detect")(state)]
    return detected[0] if detected else next(f for f in FORMATS.values() if f.detect is None)


def _peft_scale(metadata: dict) -> float | None:
    config = json.loads(metadata.get(PEFT_META, "{}") or "{}")
    config = {k.removeprefix("transformer.").removeprefix("unet."): v for k, v in config.items()}
    if not config:
        return None
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise KeyError("per-layer rank_pattern/alpha_pattern in the LoRA config are not supported")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_peft(state, metadata, out_features, hint, family) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The diffusers format's reader: diffusers/peft keys '[transformer.]<module>.lora_A.weight'; the scale from the LoRA config in the
    metadata, else a '<module>.alpha' tensor, else 1 (as diffusers' loader reads such files)."""
    config_scale = _peft_scale(metadata)
    modules = {}
    for key in state:
        m = re.fullmatch(r"(?:transformer\.|unet\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            if key.endswith(".alpha") or MAGNITUDE_KEY.fullmatch(key):
                continue
            raise KeyError(f"key {key!r} is neither a denoiser LoRA factor nor an alpha")
        modules.setdefault(m.group(1), {})[m.group(2)] = state[key].float()
    stray = [n for n in modules if n not in out_features or set(modules[n]) != {"A", "B"}]
    if stray:
        raise KeyError(f"modules this {family} model lacks, or without both factors: {stray[:4]}")
    out = {}
    for name, f in modules.items():
        alpha = next((state[k] for k in (f"{name}.alpha", f"transformer.{name}.alpha", f"unet.{name}.alpha")
                      if k in state), None)
        scale = config_scale if config_scale is not None else (
            float(alpha) / f["A"].shape[0] if alpha is not None else 1.0)
        out[name] = (f["A"], f["B"], scale)
    return out


def read_peft_dora(state, out_features, layers, family) -> DoraVectors | None:
    """The diffusers format's DoRA vectors: peft's '[transformer.]<module>.lora_magnitude_vector' (peft's own
    state-dict key; '.weight' after it, as diffusers' kohya converter writes it, is read too)."""
    vectors = {}
    for key, value in state.items():
        m = MAGNITUDE_KEY.fullmatch(key)
        if m is not None:
            if m.group(1) not in layers:
                raise KeyError(f"DoRA magnitude {key!r} belongs to no adapted module of the file")
            vectors[m.group(1)] = value.float().reshape(-1)
    return DoraVectors(PEFT, vectors) if vectors else None


def _suffixes(names: list[str], all_names: list[str]) -> list[str] | None:
    """Module-name suffixes (target_modules) that select exactly ``names`` among ``all_names``."""
    inner = sorted({re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", n) for n in names})
    chosen = {n for n in all_names if any(n == s or n.endswith("." + s) for s in inner)}
    return inner if chosen == set(names) else None


def check(lf: LoraFile, rank: int, targets: list[str], has_offset: bool, method: str,
          all_names: list[str]) -> None:
    """The file must fit the arm: same rank, same adapted modules, an init term only where one exists."""
    where = f"adapter.init_from {lf.path}"
    problems = []
    if lf.rank != rank:
        problems.append(f"adapter.rank is {rank} but the file's rank is {lf.rank} -> fix: set adapter.rank={lf.rank}")
    if lf.offset and not has_offset:
        problems.append(f"the file carries the frozen init term of a {lf.meta.get('method')} arm, which "
                        f"adapter.init {method} has not -> fix: continue it with adapter.init={lf.meta.get('method')}")
    extra, missing = sorted(set(lf.layers) - set(targets)), sorted(set(targets) - set(lf.layers))
    if extra or missing:
        names = sorted(lf.layers)
        suffixes = _suffixes(names, all_names)
        fix = f"adapter.target_modules={json.dumps(suffixes or names)}"
        problems.append(f"adapter.targets/target_modules select other modules than the file adapts (the file "
                        f"has {len(extra)} more, e.g. {extra[:3]}; the config {len(missing)} more, e.g. "
                        f"{missing[:3]}) -> fix: set {fix}")
    if problems:
        raise AdapterError(f"{where} does not fit the config: " + "; ".join(problems))
