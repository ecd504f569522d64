"""Generating with a run's exported adapters on one loaded base: the base pipeline is loaded once,
every arm's adapter file is loaded into it once (diffusers' ``load_lora_weights``, under its own
adapter name), and generating switches between them (or disables them all for the base model)."""

from __future__ import annotations

from pathlib import Path

from fluxlora.errors import RunError
from fluxlora.rundir import GroupDir

BASE = "base"


def open_run(run_dir: Path):
    """(GroupDir, its resolved config) of a run folder; a clear error when it is not one."""
    from fluxlora.config import load_config

    group = GroupDir(run_dir)
    if not group.config_file.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml) -> fix: pass runs/<name>")
    return group, load_config(group.config_file)


class AdapterBench:
    """The base model of a run group plus its arms' exported adapters, ready to generate."""

    def __init__(self, run_dir: Path, device: str | None = None):
        import torch

        from fluxlora import families, modelpath

        self.group, self.cfg = open_run(run_dir)
        m = self.cfg.model
        self.family = families.get(m.family)
        self.pipe = modelpath.load_base(self.family, m.path, m.dtype, m.revision, m.quantize)
        # On a GPU machine the denoiser lives there; the text encoders visit only to encode a prompt and
        # the VAE only to decode (the same placement as training, docs/design.md decision 4).
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.family.denoiser(self.pipe).to(self.device)
        self.max_len = modelpath.max_sequence_length(self.family, m.path, m.max_sequence_length)
        self.loaded: dict[str, str] = {}  # arm -> adapter name inside the pipeline
        self._negative = None

    def arms_with_adapters(self) -> list[str]:
        return [a.name for a in self.group.arms() if a.adapter_file.is_file()]

    def _activate(self, arm: str | None) -> None:
        if arm is None or arm == BASE:
            if self.loaded:
                self.pipe.disable_lora()
            return
        if arm not in self.loaded:
            file = self.group.arm(arm).adapter_file
            if not file.is_file():
                raise RunError(f"{file} does not exist -> fix: finish training or run fluxlora export")
            self.pipe.load_lora_weights(str(file), adapter_name=f"arm_{arm}")
            self.loaded[arm] = f"arm_{arm}"
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.loaded[arm]])

    def image(self, arm: str | None, prompt: str, seed: int, steps: int | None = None):
        """One image (PIL) of ``prompt`` at ``seed`` with ``arm``'s adapter (None or 'base': no adapter),
        at the run's sampling settings."""
        self._activate(arm)
        from fluxlora.families.pipeline import on_device

        s = self.cfg.sample
        with on_device(self.device, *self.family.text_encoders(self.pipe)):
            cond = self.family.encode_prompts(self.pipe, [prompt], self.max_len)
            if self._negative is None:
                self._negative = self.family.encode_prompts(self.pipe, [s.negative_prompt], self.max_len)
        return self.family.generate(self.pipe, cond, self._negative, [seed], s.resolution or self.cfg.data.largest,
                                    steps or s.steps, s.guidance, s.true_cfg)[0]

    def side_by_side(self, prompt: str, seed: int, steps: int | None = None, with_base: bool = True):
        """[(label, image)] for the base model (optional) and every arm that has an exported adapter."""
        names = ([BASE] if with_base else []) + self.arms_with_adapters()
        return [(name, self.image(name, prompt, seed, steps)) for name in names]
