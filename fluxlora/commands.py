"""The CLI commands' bodies: train, export, sample."""

from __future__ import annotations

from pathlib import Path

from fluxlora.rundir import GroupDir


def train(config: str, overrides: list[str], resume: bool) -> int:
    from fluxlora.config import load_config
    from fluxlora.runner import run, summary_table

    cfg = load_config(config, overrides)
    results = run(cfg, resume=resume)
    print(summary_table(results))
    print(f"run folder: {Path(cfg.output_dir) / cfg.name}")
    return 1 if any("error" in r for r in results) else 0


def _open_run(run_dir: Path):
    from fluxlora.config import load_config
    from fluxlora.runner import RunError

    group = GroupDir(run_dir)
    if not group.config_file.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml) -> fix: pass runs/<name>")
    return group, load_config(group.config_file)


def export(run_dir: Path, arms: list[str] | None) -> int:
    """Rebuild each arm from its latest checkpoint on the pristine base and write adapter.safetensors."""
    from safetensors.torch import load_file

    from fluxlora import adapters, checkpoint
    from fluxlora import export as exporter
    from fluxlora.families import FAMILIES
    from fluxlora.runner import RunError

    group, cfg = _open_run(run_dir)
    family = FAMILIES[cfg.model.family]
    pipe = family.load_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.revision, cfg.model.quantize)
    from fluxlora.config import arm_config

    model = pipe.transformer
    for name in arms or cfg.adapter.arms:
        arm, a = group.arm(name), arm_config(cfg, name).adapter
        ckpt = checkpoint.find(arm, "latest")
        if ckpt is None:
            raise RunError(f"arm {name} of {run_dir} has no complete checkpoint to export from")
        scale = adapters.scale_for(a.rank, a.effective_alpha, a.scaling, a.alpha_coefficient)
        targets = adapters.find_targets(model, a.target_modules or family.TARGET_PRESETS[a.targets])
        info = adapters.inject(model, name, a.rank, scale, targets, skip_init=True)
        adapters.load_adapter_state(model, load_file(str(ckpt / "adapter.safetensors")))
        step = int(ckpt.name.split("-")[1])
        path = exporter.export_arm(model, info, arm, arm_config(cfg, name), name, step)
        adapters.remove(model, info)
        print(f"{name}: {path} (from {ckpt.name})")
    return 0


def sample(run_dir: Path, prompt: str, seed: int, steps: int | None, arm_name: str | None,
           out: str | None) -> int:
    """Generate through diffusers' own loader: FluxPipeline + load_lora_weights(adapter.safetensors)."""
    from fluxlora.compare import AdapterBench

    bench = AdapterBench(run_dir)
    arm = arm_name or bench.cfg.adapter.arms[0]
    image = bench.image(arm, prompt, seed, steps)
    path = Path(out) if out else bench.group.arm(arm).root / f"sample-{seed}.png"
    image.save(path)
    print(path)
    return 0


def info(path: Path) -> int:
    """Print what an exported adapter file says about itself (fluxlora record + LoRA config)."""
    import json

    from fluxlora.export import read_metadata
    from fluxlora.runner import RunError

    if not path.is_file():
        raise RunError(f"{path} is not a file -> fix: pass an exported adapter.safetensors")
    try:
        meta = read_metadata(path)
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise RunError(f"{path} is not a readable safetensors file ({e})") from e
    config = meta.pop("lora_config", {})
    for key in sorted(meta):
        print(f"{key:>14}: {meta[key]}")
    short = {k.removeprefix("transformer."): v for k, v in config.items()}
    print(f"{'lora_config':>14}: " + json.dumps({k: short[k] for k in ("r", "lora_alpha", "use_rslora",
                                                                        "init_lora_weights") if k in short}))
    return 0
