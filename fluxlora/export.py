"""Portable adapter files, written atomically, each with fluxlora's metadata record, in the formats of the
format table (formats.py):

- ``diffusers`` (adapter.safetensors): diffusers/peft keys written by the family pipeline's own
  save_lora_weights, LoRA config in the metadata (so ``load_lora_weights`` restores alpha);
- ``comfyui`` (adapter_comfyui.safetensors): kohya keys on the original checkpoint's modules (FLUX: BFL's,
  SD3: Stability's MMDiT, SDXL / SD 1.5: the UNet's), fused layers built exactly, an ``.alpha`` tensor
  beside every adapter (kohya.py).

A DoRA arm's files carry its magnitudes too: peft's ``<module>.lora_magnitude_vector`` in the diffusers file,
ComfyUI's ``.dora_scale`` in the kohya one (kohya_dora.py; docs/dora.md).

Optionally at a lower rank: the truncated SVD of every layer's delta, with the error it introduces."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxlora import adapters, dora_layers, kohya, kohya_dora
from fluxlora.errors import AdapterError, ModelLoadError
from fluxlora.formats import FORMATS
from fluxlora.rundir import ArmDir

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
META_KEY = "fluxlora"
HASHED = "transformer/*.safetensors"  # what base_model_hash covers (the module the LoRA applies to)


@dataclass
class RankTruncation:
    """Factors re-cut to a lower rank and the relative Frobenius error ||dW - dW_R|| / ||dW||."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda kv: kv[1])


@torch.no_grad()
def truncate_rank(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> RankTruncation:
    """Best rank-``rank`` factors of each delta B A (Eckart-Young), in fp32. The SVD runs on the small
    k x k core: B = Qb Rb, A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T and the core's singular values are
    those of B A; a 3072 x 12288 layer costs no large SVD."""
    out, errors, tail_sum, total_sum = {}, {}, 0.0, 0.0
    for name, (a, b) in layers.items():
        qb, rb = torch.linalg.qr(b.double())
        qa, ra = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        out[name] = ((root[:, None] * (vh[:k] @ qa.T)).float(), ((qb @ u[:, :k]) * root).float())
        tail, total = float(s[k:].pow(2).sum()), float(s.pow(2).sum())
        errors[name] = math.sqrt(tail / total) if total > 0 else 0.0
        tail_sum, total_sum = tail_sum + tail, total_sum + total
    return RankTruncation(out, rank, errors, math.sqrt(tail_sum / total_sum) if total_sum > 0 else 0.0)


def balanced(layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same deltas, re-factored at full rank as sqrt(S) V^T and U sqrt(S) of each B A (fp64 QR + SVD of
    the small core). An offset arm's factors [A; A0], [B, -B0] nearly cancel, so a bf16 / fp16 cast of them
    loses far more of the delta than a plain LoRA's; balanced factors carry only the delta and do not."""
    return {name: truncate_rank({name: ab}, ab[0].shape[0]).layers[name] for name, ab in layers.items()}


@torch.no_grad()
def cast_error(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, path: Path,
               out_features: dict[str, int], family: str) -> tuple[float, tuple[str, float]]:
    """Relative Frobenius error of the file's deltas against the fp32 ones, read back through our reader:
    (overall, (worst layer, its error)). ||s B A - s' B' A'||^2 = tr((X^T X)(Y Y^T)) with X = [s B, -s' B'],
    Y = [A; A']: no n x m product."""
    from fluxlora import lorafile

    read = lorafile.read(path, out_features, family).layers
    errors, err_sum, total_sum = {}, 0.0, 0.0
    for name, (a, b) in layers.items():
        fa, fb, fs = read[name]
        x = torch.cat([scale * b.double(), -fs * fb.double()], dim=1)
        y = torch.cat([a.double(), fa.double()], dim=0)
        err = float(((x.T @ x) * (y @ y.T)).sum().clamp_min(0.0))
        total = float(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum()) * scale * scale
        errors[name] = math.sqrt(err / total) if total > 0 else 0.0
        err_sum, total_sum = err_sum + err, total_sum + total
    worst = max(errors.items(), key=lambda kv: kv[1])
    return (math.sqrt(err_sum / total_sum) if total_sum > 0 else 0.0), worst


WARN_CAST_ERROR = 0.01  # a file whose cast delta is off by more than 1% gets a warning


def cast_lines(errors: dict) -> list[tuple[Path, str]]:
    """One report line per file of export_arm's cast errors; "warning:" above WARN_CAST_ERROR."""
    out = []
    for path, (overall, (layer, worst)) in errors.items():
        flag = "warning: " if worst > WARN_CAST_ERROR else ""
        fix = (" -> export in fp32 (export.dtype / --dtype fp32) for this file" if worst > WARN_CAST_ERROR else "")
        out.append((path, f"{flag}relative delta error after the cast: overall {overall:.2e}, worst layer "
                          f"{worst:.2e} ({layer}){fix}"))
    return out


# ----- base model identity ----------------------------------------------------------------------------

def _hash_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fluxlora" / "model_hashes.json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def base_model_hash(path: str) -> str | None:
    """sha256 over the lines '<file name> <sha256>' of the local pipeline's transformer/*.safetensors
    (sorted); None for a hub id. File hashes are cached by (path, size, mtime) in
    $XDG_CACHE_HOME/fluxlora/model_hashes.json: a 24 GB FLUX transformer is read once, not per export."""
    from fluxlora.modelpath import resolve

    try:
        local = Path(resolve(path))
    except ModelLoadError:
        return None
    files = sorted((local / "transformer").glob("*.safetensors")) if local.is_dir() else []
    if not files:
        return None
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    lines = []
    for f in files:
        st, key = f.stat(), str(f.resolve())
        entry = cache.get(key, {})
        if entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(f)}
        lines.append(f"{f.name} {entry['sha256']}")
    cache = {k: v for k, v in cache.items() if Path(k).exists()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache_file, lambda tmp: Path(tmp).write_text(json.dumps(cache, indent=1)))
    except OSError:
        pass  # an unwritable cache only costs the next export the hashing time
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ----- writers ------------------------------------------------------------------------------------------

def sweep_partial(arm: ArmDir) -> None:
    """Remove the .export-* temp files and folders an interrupted export left in the arm's folder."""
    for partial in arm.root.glob(".export-*"):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cast(layers, dtype: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    to = EXPORT_DTYPES[dtype]
    return {name: (a.to(to), b.to(to)) for name, (a, b) in layers.items()}


def write_diffusers(path: Path, layers, scale: float, dtype: str, meta: dict, out_features: dict, family,
                    dora: dora_layers.DoraExport | None = None) -> None:
    """Write through the family pipeline's save_lora_weights into a temp dir, add our metadata, rename in
    place. The scale is folded into the factors (sqrt(s) into each, in fp32 before the cast) and the LoRA
    config says alpha = rank: a loader that ignores the metadata's alpha (ComfyUI, ai-toolkit) applies the
    same delta as one that reads it (diffusers). ``folded_scale`` in our record keeps s. DoRA: the config says
    use_dora and peft's magnitude goes in as it is (fp32), unchanged by the folding (the delta is the same)."""
    rank = next(iter(layers.values()))[0].shape[0]
    root = math.sqrt(scale)
    folded = {name: (a * root, b * root) for name, (a, b) in layers.items()}
    state = {}
    for name, (a, b) in _cast(folded, dtype).items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
        if dora is not None:
            state[f"{name}.lora_magnitude_vector"] = dora.magnitudes[name].float().contiguous()
    meta = {**meta, "alpha": float(rank), "folded_scale": scale}
    config = adapters.lora_config(rank, 1.0, list(layers), 0.0, dora is not None).to_dict()
    config["init_lora_weights"] = True  # loaders must never re-run an init (docs/design.md environment fact E2)
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        component = family.lora_component
        family.pipeline_class().save_lora_weights(tmp, weight_name="a.safetensors",
                                                  **{f"{component}_lora_layers": state,
                                                     f"{component}_lora_adapter_metadata": config})
        with safe_open(os.path.join(tmp, "a.safetensors"), "pt") as f:
            metadata = dict(f.metadata() or {})
        metadata[META_KEY] = json.dumps(meta, sort_keys=True)
        final_tmp = os.path.join(tmp, "b.safetensors")
        save_file(load_file(os.path.join(tmp, "a.safetensors")), final_tmp, metadata=metadata)
        os.replace(final_tmp, path)


def write_comfyui(path: Path, layers, scale: float, dtype: str, meta: dict, out_features: dict, family,
                  dora: dora_layers.DoraExport | None = None) -> None:
    """kohya keys (fused layers built exactly, alpha in fp32 beside each adapter). DoRA: a dora_scale beside
    each adapter (fp32), computed from the cast tensors ComfyUI will read (kohya_dora.scales)."""
    to = EXPORT_DTYPES[dtype]
    state = kohya.to_kohya(layers, scale, out_features, family.name)
    state = {k: v if k.endswith(".alpha") else v.to(to) for k, v in state.items()}
    if dora is not None:
        state.update(kohya_dora.scales(state, dora, out_features, family.name))
    save_kohya_file(path, state, meta)


def save_kohya_file(path: Path, state: dict, meta: dict) -> None:
    """kohya keys only, no diffusers LoRA config: diffusers' kohya reader must take alpha from the
    tensors (a LoRA config in the metadata would scale the already-scaled weights again)."""
    metadata = {META_KEY: json.dumps(meta, sort_keys=True), "format": "pt"}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def write(path: Path, fmt: str, layers, scale: float, dtype: str, meta: dict, out_features: dict,
          family, dora: dora_layers.DoraExport | None = None) -> None:
    """One file of ``layers`` (fp32 factors, cast to ``dtype`` only after fusing / folding the scale), with a
    DoRA arm's magnitudes (``dora``)."""
    rank = next(iter(layers.values()))[0].shape[0]
    meta = {**meta, "format": fmt, "dtype": dtype, "export_rank": rank, "alpha": rank * scale}
    FORMATS[fmt].fn("write")(path, layers, scale, dtype, meta, out_features, family, dora)


def metadata(*, base_model: str, revision: str | None, family: str, method: str, info: adapters.AdapterInfo,
             trigger: str | None, steps: int, config_hash: str) -> dict:
    """What an exported file says about itself (`fluxlora info FILE` prints it)."""
    return {
        "base_model": base_model, "base_model_revision": revision,
        "base_model_hash": base_model_hash(base_model), "base_model_hash_of": HASHED,
        "family": family, "method": method, "rank": info.rank, "scale": info.scale,
        "offset": info.has_offset, "dora": info.dora, "trigger": trigger, "steps": steps,
        "config_hash": config_hash, "targets": info.targets,
    }


def check_formats(formats: list[str], targets: list[str], family: str) -> None:
    """Refuse before training what a chosen format cannot hold."""
    for fmt in formats:
        f = FORMATS[fmt]
        bad = f.fn("unmappable")(targets, family) if f.unmappable else []
        if bad:
            others = [n for n in formats if n != fmt] or ["diffusers"]
            raise AdapterError(f"adapter targets {bad[:4]} have no counterpart in the {fmt} format's keys, so the "
                               f"{fmt} export cannot hold them -> fix: remove them from adapter.target_modules "
                               f"or set export.formats=[{','.join(others)}]")


def export_arm(model, info: adapters.AdapterInfo, arm: ArmDir, meta: dict, family, formats: list[str],
               dtype: str, rank: int | None = None) -> tuple[list[Path], RankTruncation | None]:
    """The arm's files of the exact delta against the pristine base (rank 2r with an offset), or its
    best rank-``rank`` approximation (files named ...-r<rank>.safetensors). A DoRA arm's magnitudes go with
    either (with a re-cut delta, W' = m (W + dW_R) / ||W + dW_R||_row)."""
    check_formats(formats, info.targets, family.name)
    layers, meta, truncation = adapters.export_factors(model, info), dict(meta), None
    if rank is not None:
        current = next(iter(layers.values()))[0].shape[0]
        if not 1 <= rank < current:
            raise AdapterError(f"--rank {rank} is not between 1 and the exported rank {current} of arm "
                               f"{info.method}: nothing to shrink -> fix: choose a rank from 1 to {current - 1}")
        truncation = truncate_rank(layers, rank)
        layers = truncation.layers
        meta.update(offset=False, refactored_from=current, refactor_error=truncation.overall,
                    refactor_error_max=truncation.worst[1])
    if dtype != "fp32" and info.has_offset and truncation is None:  # a cast would amplify the near-cancellation
        layers = balanced(layers)
        meta.update(offset=False, refactored="balanced")
    out_features, dora = adapters.linear_out_features(model), dora_layers.export_part(model, info)
    paths, errors = [], {}
    for fmt in formats:
        path = arm.export_file(fmt, rank)
        write(path, fmt, layers, info.scale, dtype, meta, out_features, family, dora)
        paths.append(path)
        if dtype != "fp32":
            errors[path] = cast_error(layers, info.scale, path, out_features, family.name)
    return paths, truncation, errors


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    out = {"lora_config": json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")}
    out.update(json.loads(metadata.get(META_KEY, "{}") or "{}"))
    return out
