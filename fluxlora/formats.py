"""The export-format table: each portable adapter file format, its file name, the families it serves, how
to recognise it and the functions that write and read it. Torch-free (the config, the CLI, the run folder
and the web UI's download list read it); ``write``/``read`` are "module:function" loaded on use.

- writer: ``fn(path, layers, scale, dtype, meta, out_features, family, dora)`` with layers {module: (A [r, in],
  B [out, r])} in fp32, the delta ``scale * B A``, ``family`` the family object (families/interface.py) and
  ``dora`` a DoRA arm's dora_layers.DoraExport (None without DoRA; docs/dora.md);
- reader: ``fn(state, metadata, out_features, targets_hint, family_name) -> {module: (A, B, s)}``;
- detect: ``fn(keys) -> bool`` (None: the format read when no other one recognises the file);
- unmappable: ``fn(targets, family_name) -> targets the format cannot hold`` (None: it holds any Linear
  module);
- drops: ``fn(targets, family_name) -> warning lines``: layers a known loader of the format silently skips,
  each line naming the loader, the layers and the file to use there instead (None: no known loader drops any).
- dora: ``fn(state, out_features, layers, family_name) -> lorafile.DoraVectors | None``: a file's DoRA vectors
  (``layers``: what ``read`` gave);
- dora_drops: the warning line for a DoRA arm's file when a known loader of the format drops DoRA's part.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from fluxlora.families import SPECS

ALL = tuple(SPECS)
KOHYA = tuple(name for name, spec in SPECS.items() if spec.kohya_keys)  # the families with a kohya key map


@dataclass(frozen=True)
class Format:
    name: str
    file_name: str
    families: tuple[str, ...]
    write: str
    read: str
    detect: str | None
    unmappable: str | None
    description: str
    drops: str | None = None
    dora: str | None = None
    dora_drops: str | None = None

    def fn(self, what: str):
        module, _, attr = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attr)

    def file_for(self, rank: int | None = None) -> str:
        """The file name, or its re-factorized variant (``fluxlora export --rank``)."""
        return self.file_name.replace(".safetensors", f"-r{rank}.safetensors") if rank else self.file_name


FORMATS = {f.name: f for f in (
    Format("diffusers", "adapter.safetensors", ALL, "fluxlora.export:write_diffusers", "fluxlora.lorafile:read_peft",
           None, None, "diffusers/peft keys, LoRA config in the metadata (load_lora_weights)",
           dora="fluxlora.lorafile:read_peft_dora"),
    Format("comfyui", "adapter_comfyui.safetensors", KOHYA, "fluxlora.export:write_comfyui",
           "fluxlora.kohya:read", "fluxlora.kohya:is_kohya", "fluxlora.kohya:unmappable",
           "kohya keys on the original checkpoint's modules with an .alpha each (ComfyUI, sd-scripts)",
           "fluxlora.kohya:loader_drops", dora="fluxlora.kohya_dora:read",
           dora_drops="adapter_comfyui.safetensors: diffusers' kohya reader drops every dora_scale (DoRA's "
           "magnitude; diffusers warns) and applies a plain LoRA -> in diffusers load adapter.safetensors instead "
           "(ComfyUI applies dora_scale; docs/dora.md)"),
)}


def loader_warnings(formats: list[str], targets: list[str], family: str, dora: bool = False) -> list[str]:
    """Every known loader's silent drop of some of ``targets`` (or, with ``dora``, of DoRA's magnitudes) from
    the chosen formats' files."""
    lines = [line for name in formats if FORMATS[name].drops
             for line in FORMATS[name].fn("drops")(targets, family)]
    return lines + [FORMATS[name].dora_drops for name in formats if dora and FORMATS[name].dora_drops]


def for_family(family: str) -> list[str]:
    return [f.name for f in FORMATS.values() if family in f.families]
