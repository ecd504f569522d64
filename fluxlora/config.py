"""The typed run config: the single source of truth. Strict (unknown keys are errors), every problem
reported at once with its field path, the bad value and the fix. Imports no torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from fluxlora import config_checks, formats, methods
from fluxlora.config_base import Float, NoOr, Section
from fluxlora.config_errors import ConfigError, Problem, did_you_mean, problems_from, section_fields
from fluxlora.config_eval import MetricsConfig, ValidationConfig
from fluxlora.families import LOSS_WEIGHTINGS, SPECS
from fluxlora.yamlsafe import YamlProblem, load_yaml

# Names come from the registries (torch-free tables): families, init methods, export formats.
KNOWN_FAMILIES = tuple(SPECS)
KNOWN_INITS = tuple(methods.METHODS)


class ModelConfig(Section):
    family: str = Field("flux", description=f"model family: {', '.join(SPECS)}")
    path: str = Field(description="'toy', a local diffusers pipeline directory, or a hub id")
    revision: str | None = Field(None, description="hub revision")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="weights / compute dtype")
    quantize: Literal["none", "int8", "nf4"] = Field("none", description="bitsandbytes base weights")
    max_sequence_length: int | None = Field(None, ge=1, le=512, description="T5 tokens (None: model default)")

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in KNOWN_FAMILIES:
            raise ValueError(f"unknown family {v!r}; valid: {', '.join(KNOWN_FAMILIES)}")
        return v


class DataConfig(Section):
    instance_dir: str = Field(description="folder of subject images (+ optional same-name .txt captions)")
    instance_prompt: str | None = Field(None, description="caption for images without a .txt")
    trigger: str | None = Field(None, description="the word that names the subject in the captions; written "
                                "into exported files (None: the instance_prompt)")
    resolution: int | list[int] = Field(512, description="training side in px (multiple of 16), or a list of "
                                        "them: every image trains at each (multi-resolution)")
    buckets: bool | None = Field(None, description="aspect-ratio buckets: each image at the size of about "
                                 "resolution^2 px closest to its shape (None: on, except for the toy model)")
    bucket_step: int | None = Field(None, ge=8, le=1024, multiple_of=8, description="bucket sides are multiples "
                                    "of this many px (None: 64, finer below 512 px; never finer than the model's "
                                    "latent granularity)")
    center_crop: bool = Field(True, description="centre crop (else random crop)")
    random_flip: bool = Field(False, description="also train on mirrored images")
    repeats: int = Field(1, ge=1, description="each image appears this many times per epoch (shuffled together)")
    caption_dropout: Float = Field(0.0, ge=0, lt=1, description="probability that a training row uses the empty "
                                   "caption (the unconditional input) instead of its own")
    shuffle_tags: bool = Field(False, description="shuffle the comma-separated tags of each caption per step")
    keep_tokens: int = Field(0, ge=0, description="with shuffle_tags: the first N tags stay in place (the trigger)")
    tag_variants: int = Field(8, ge=2, le=64, description="with shuffle_tags: shuffled orders cached per caption "
                              "(text embeddings are encoded once, never per step)")
    alpha_mask: bool = Field(False, description="use each image's alpha channel as its loss mask (a photo.mask.png "
                             "beside the image is used either way, and wins)")
    mask_background_weight: Float = Field(0.0, ge=0, le=1, description="loss weight of the pixels a mask marks "
                                          "as not the subject (0: ignored; 1: no masking)")
    recursive: bool = Field(False, description="also use the images in sub-folders of instance_dir (captions "
                            "beside each image)")
    class_dir: str | None = Field(None, description="prior-preservation class images")
    class_prompt: str | None = Field(None, description="caption of the class images")
    num_class_images: int = Field(0, ge=0, description="generate class images up to this many")
    prior_loss_weight: Float = Field(1.0, ge=0, description="weight of the prior-preservation loss")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="held-out validation loss")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v):
        sides = [v] if isinstance(v, int) else list(v)
        if not sides:
            raise ValueError("an empty list -> fix: give at least one side, e.g. 512")
        bad = [r for r in sides if not (16 <= r <= 4096 and r % 16 == 0)]
        if bad:
            raise ValueError(f"{', '.join(map(str, bad))}: not a training side -> fix: use a value >= 16, <= 4096, "
                             "a multiple of 16 (or a list of such sides for multi-resolution)")
        if len(set(sides)) != len(sides):
            raise ValueError(f"a side is listed twice: {sides} -> fix: give each resolution once")
        return v

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution] if isinstance(self.resolution, int) else list(self.resolution)

    @property
    def largest(self) -> int:
        """The largest training side: samples and class images use it unless set otherwise."""
        return max(self.resolutions)

    @model_validator(mode="after")
    def _prior(self):
        if (self.class_dir or self.num_class_images) and not self.class_prompt:
            raise ValueError("prior preservation (class_dir / num_class_images) needs data.class_prompt")
        return self


class ArmOverride(Section):
    """Per-arm settings that differ from the shared ones (the arm is named by its init method)."""

    rank: int | None = Field(None, ge=1, le=1024)
    alpha: Float | None = Field(None, gt=0)
    scaling: Literal["standard", "rslora", "lora_alpha"] | None = None
    alpha_coefficient: Float | None = Field(None, gt=0)
    lr: Float | None = Field(None, gt=0, lt=1)


class AdapterConfig(Section):
    init: str | list[str] = Field("lora", description="init method, or a list of arms to compare")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    alpha: Float | None = Field(None, gt=0, description="LoRA alpha (None: alpha = rank)")
    dropout: Float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    targets: Literal["attn", "attn_context", "wide"] = Field("attn", description="target preset")
    target_modules: list[str] | None = Field(None, description="explicit module-name suffixes")
    scaling: Literal["standard", "rslora", "lora_alpha"] = Field("standard", description="scale rule")
    # Default from the toy sweep in BENCHMARKS.md (not the LLM calibration C ~ 256).
    alpha_coefficient: Float = Field(16.0, gt=0, description="C of the lora_alpha rule: s = C/sqrt(r)")
    lr_ratio_b: Float = Field(1.0, gt=0, description="LoRA+ ratio of B's learning rate")
    dora: bool = Field(False, description="DoRA: also train a per-output magnitude of the adapted weight "
                       "(weight-decomposed LoRA)")
    pissa_niter: int = Field(4, ge=0, description="subspace iterations of pissa_fast")
    sb_batches: int = Field(3, ge=1, description="data-driven inits (docs/methods.md 13): micro-batches whose loss "
                            "gradient or layer inputs they read (lora_sb: each subject image at most once)")
    init_pass_gb: Float = Field(2.0, gt=0, description="data-driven inits: the most GiB of pass statistics held at "
                                "once (the pass runs per chunk of targets that fits; docs/methods.md 13)")
    init_from: str | None = Field(None, description="continue from this LoRA .safetensors (ours, diffusers or "
                                  "kohya/ComfyUI keys); its rank and modules must match the arm's")
    overrides: dict[str, ArmOverride] = Field(default_factory=dict,
                                              description="per-arm rank/alpha/scaling/lr, keyed by method")

    @field_validator("init")
    @classmethod
    def _arms(cls, v):
        arms = [v] if isinstance(v, str) else list(v)
        if not arms:
            raise ValueError("adapter.init is an empty list; give at least one method")
        bad = [m for m in arms if m not in KNOWN_INITS]
        if bad:
            raise ValueError(f"unknown init method(s) {bad}; valid: {', '.join(KNOWN_INITS)}")
        if len(set(arms)) != len(arms):
            raise ValueError(f"adapter.init lists a method twice: {arms}")
        return v

    @model_validator(mode="after")
    def _ranks(self):
        for name in self.arms:
            m, o = methods.METHODS[name], self.overrides.get(name)
            rank = o.rank if o is not None and o.rank is not None else self.rank
            if rank < m.min_rank:
                field = f"adapter.overrides.{name}.rank" if o is not None and o.rank is not None else "adapter.rank"
                raise ValueError(f"{field} {rank} is too small for {name}: {m.min_rank_why} -> use a rank >= "
                                 f"{m.min_rank}")
        return self

    @model_validator(mode="after")
    def _overrides(self):
        stray = [k for k in self.overrides if k not in self.arms]
        if stray:
            raise ValueError(f"adapter.overrides names arms that are not in adapter.init: {stray}")
        for name, o in self.overrides.items():
            fixed = methods.METHODS[name].fixed_scale
            moot = [k for k in ("alpha", "scaling", "alpha_coefficient") if getattr(o, k) is not None]
            if fixed is not None and moot:
                raise ValueError(f"adapter.overrides.{name} sets {moot}, which {name} does not use (it trains "
                                 f"with scale {fixed:g}: its size comes from its init) -> remove {moot}")
        return self

    @model_validator(mode="after")
    def _dora(self):
        config_checks.dora_layer_kinds(self)
        return self

    @property
    def arms(self) -> list[str]:
        return [self.init] if isinstance(self.init, str) else list(self.init)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class TrainConfig(Section):
    seed: int = 0
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: Float = Field(1.0e-4, gt=0, lt=1)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: Float = Field(0.0, ge=0)
    adam_beta1: Float = Field(0.9, ge=0, lt=1)
    adam_beta2: Float = Field(0.999, ge=0, lt=1)
    adam_eps: Float = Field(1.0e-8, gt=0)
    max_grad_norm: Float | None = Field(1.0, gt=0, description="clip the adapter grad norm (None: off)")
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: Float = 0.0
    logit_std: Float = Field(1.0, gt=0)
    mode_scale: Float = 1.29
    shift: Float = Field(1.0, gt=0, description="sigma shift s' = shift s / (1 + (shift - 1) s)")
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap", "min_snr"] = Field(
        "none", description="flow matching: none | sigma_sqrt | cosmap; sdxl/sd15: none | min_snr (gamma 5)")
    guidance: Float = Field(1.0, description="guidance-embedding value in training (distilled models)")
    gradient_checkpointing: bool = False
    blocks_to_swap: int = Field(0, ge=0, description="keep this many transformer blocks' frozen weights on the "
                                "CPU and move each in for its forward and backward (smaller GPUs; 0: off)")
    mixed_precision: Annotated[Literal["no", "bf16", "fp16"], NoOr] = "no"
    checkpoint_every: int = Field(250, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    resume: str | None = Field(None, description="None, 'latest' or a checkpoint folder")
    log_every: int = Field(1, ge=1)
    tensorboard: bool = Field(False, description="also write scalars to <arm>/tensorboard/ (pip install tensorboard)")
    max_bad_steps: int = Field(5, ge=1, description="consecutive non-finite losses before stopping")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be < train.steps ({self.steps})")
        return self


class SampleConfig(Section):
    every: int = Field(250, ge=0, description="0: only at step 0 and at the end")
    prompts: list[str] = Field(default_factory=list, description="empty: the instance prompt")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(20, ge=1)
    guidance: Float = Field(3.5, ge=0, description="guidance-embedding value (distilled models)")
    true_cfg: Float = Field(1.0, ge=1, description="classifier-free guidance scale with negative_prompt")
    negative_prompt: str = ""
    resolution: int | None = Field(None, ge=16, multiple_of=16, description="None: the largest data.resolution")
    offload_base: bool = Field(False, description="the frozen denoiser waits on the CPU while each sample "
                               "batch is decoded by the VAE, so the decoder's activations do not stack on it")


class ExportConfig(Section):
    # The web UI and `fluxlora sample` read the diffusers file (adapter.safetensors).
    formats: list[str] | None = Field(
        None, min_length=1,
        description="files written after training: " + "; ".join(
            f"{f.name} ({f.file_name}, {f.description})" for f in formats.FORMATS.values())
        + ". Default: every format of the family")

    @field_validator("formats")
    @classmethod
    def _known(cls, v):
        bad = [f for f in v or [] if f not in formats.FORMATS]
        if bad:
            raise ValueError(f"unknown export format(s) {bad}; valid: {', '.join(formats.FORMATS)}")
        return v
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


def arm_config(cfg: "RunConfig", method: str) -> "RunConfig":
    """The config one arm trains with: the shared settings plus that arm's overrides."""
    o = cfg.adapter.overrides.get(method)
    if o is None:
        return cfg
    adapter = {k: v for k, v in o.model_dump().items() if v is not None and k != "lr"}
    train = {"lr": o.lr} if o.lr is not None else {}
    return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update=adapter),
                                  "train": cfg.train.model_copy(update=train)})


class RunConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="run folder name")
    output_dir: str = "runs"
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    _source: str = PrivateAttr(default="<config>")  # where it was read from, for later error messages

    @property
    def source(self) -> str:
        return self._source

    def __eq__(self, other) -> bool:  # the same settings, wherever they were read from
        return isinstance(other, RunConfig) and self.model_dump() == other.model_dump()

    __hash__ = None

    @model_validator(mode="after")
    def _family_options(self):
        spec = SPECS[self.model.family]
        allowed = LOSS_WEIGHTINGS[spec.objective]
        if self.train.loss_weighting not in allowed:
            users = ", ".join(n for n, s in SPECS.items() if s.objective != spec.objective)
            kind = "flow matching" if spec.objective == "ddpm" else "the DDPM families"
            raise ValueError(f"train.loss_weighting {self.train.loss_weighting} is for {kind} ({users}), not "
                             f"{self.model.family} -> use {' or '.join(allowed)}")
        if not spec.quantizable and self.model.quantize != "none":
            quantizable = ", ".join(n for n, s in SPECS.items() if s.quantizable)
            raise ValueError(f"model.quantize {self.model.quantize} is for the transformer families ({quantizable}) "
                             f"-> set model.quantize=none for {self.model.family}")
        if self.sample.offload_base and self.model.quantize != "none":
            # bitsandbytes keeps a used layer's int8 state outside its parameters, where a model-wide .to()
            # does not move it: a quantized base cannot make the round trip safely.
            raise ValueError(f"sample.offload_base is for unquantized bases, not model.quantize "
                             f"{self.model.quantize} -> set sample.offload_base=false (a quantized base is small)")
        return self

    @model_validator(mode="after")
    def _export_formats(self):
        allowed = formats.for_family(self.model.family)
        if self.export.formats is None:
            self.export.formats = list(allowed)
        elif bad := [f for f in self.export.formats if f not in allowed]:
            raise ValueError(f"export.formats {bad} is not available for the {self.model.family} family -> "
                             f"use export.formats={allowed}")
        return self

    @model_validator(mode="after")
    def _block_swap(self):
        config_checks.block_swap(self)
        return self

    @model_validator(mode="after")
    def _prior_data(self):
        config_checks.prior_data(self)
        return self


# ----- loading and reporting ------------------------------------------------------------------------

def _apply_overrides(raw: dict, overrides: Sequence[str], problems: list[Problem]) -> None:
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, None, "override is not key.path=value", "write e.g. train.steps=100"))
            continue
        path, text = item.split("=", 1)
        keys = tuple(path.strip().split("."))
        fields = section_fields(RunConfig, keys[:-1])
        if fields is None or keys[-1] not in fields:
            parent = fields or RunConfig.model_fields
            problems.append(Problem(path, None, "no such config field", did_you_mean(keys[-1], parent)))
            continue
        try:
            value = load_yaml(text) if text.strip() else ""
        except YamlProblem as e:
            problems.append(Problem(path, repr(text), e.message, "quote the value or fix its syntax"))
            continue
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[keys[-1]] = value


def parse_config(data: Any, overrides: Sequence[str] = (), source: str = "<config>") -> RunConfig:
    problems: list[Problem] = []
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise ConfigError(source, [Problem("(document)", None, f"the config must be a mapping of sections, "
                                           f"got {kind}", "write `name:`, `model:`, `data:` ... at top level")])
    raw = json.loads(json.dumps(data, default=str))  # a deep copy we may modify
    _apply_overrides(raw, overrides, problems)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        problems.extend(problems_from(RunConfig, e))
        cfg = None
    if problems:
        raise ConfigError(source, problems)
    cfg._source = source
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem(str(path), None, "config file not found",
                                              "check the path (see train_configs/ for examples)")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), [Problem(str(path), None, f"cannot read: {e}", "save it as UTF-8")]) from None
    try:
        data = load_yaml(text)
    except YamlProblem as e:
        where = f"{path}:{e.line}:{e.column}" if e.line else str(path)
        raise ConfigError(str(path), [Problem(where, None, e.message, e.fix)]) from None
    return parse_config(data, overrides, str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_hash(cfg: RunConfig) -> str:
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
