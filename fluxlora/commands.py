"""The CLI commands' bodies: train (and its dry run), export, sample, info."""

from __future__ import annotations

from pathlib import Path


def train(config: str, overrides: list[str], resume: bool, arms_parallel: int | None = None,
          worker_arms: str | None = None, dry_run: bool = False, dump_dataset: str | None = None) -> int:
    from fluxlora.config import load_config

    cfg = load_config(config, overrides)
    if dry_run or dump_dataset:
        from fluxlora.dryrun import dry_run as check_only

        return check_only(cfg, resume, dump_dataset)
    from accelerate import PartialState

    from fluxlora.runner import run, summary_table

    if worker_arms:  # one worker of --arms-parallel: the parent owns the run folder and reports
        results = run(cfg, resume=resume, arms=worker_arms.split(","), owner=False)
        return 1 if any("error" in r for r in results) else 0
    if arms_parallel is not None:
        from fluxlora.parallel import run_parallel

        results = run_parallel(cfg, config, overrides, resume, arms_parallel or None)
    else:
        results = run(cfg, resume=resume)
    failed = 1 if any("error" in r for r in results) else 0
    if not PartialState().is_main_process:  # data-parallel: the main process reports
        return failed
    print(summary_table(results))
    print(f"run folder: {Path(cfg.output_dir) / cfg.name}")
    return failed


def sweep(path: str, dry_run: bool, report_only: bool) -> int:
    """`fluxlora sweep`: every cell of the grid as a run folder, then report.md (sweep.py, report.py)."""
    from fluxlora import report, study
    from fluxlora import sweep as sweeps

    if study.is_study(path):
        return study_command(path, dry_run, report_only)
    if dry_run:
        return sweeps.dry_run(path)
    if report_only:
        root, _ = sweeps.plan(sweeps.load_sweep(path))
        if not (root / sweeps.STATE).exists():
            from fluxlora.errors import RunError

            raise RunError(f"{root} holds no sweep yet -> fix: run fluxlora sweep {path} first")
        print(report.write(root))
        return 0
    return _finished(sweeps.run_sweep(path))


def _finished(root) -> int:
    """Name a sweep's or study's report; 0 when every cell is done, else 1."""
    from fluxlora.report import REPORT
    from fluxlora.rundir import SWEEP_STATE, read_json

    print(f"report: {root / REPORT}")
    return 0 if (read_json(root / SWEEP_STATE, {}) or {}).get("status") == "done" else 1


def study_command(path: str, dry_run: bool, report_only: bool) -> int:
    """`fluxlora sweep study.yaml`: train every part's cells, then one report over all their arms (study.py)."""
    from fluxlora import study

    if dry_run:
        return study.dry_run(path)
    if report_only:
        print(study.write(*study.plan(path)))
        return 0
    return _finished(study.run_study(path))


def parse_formats(values: list[str] | None) -> list[str] | None:
    """--format diffusers --format comfyui, or --format diffusers,comfyui; None: the config's."""
    from fluxlora.errors import RunError
    from fluxlora.formats import FORMATS

    if not values:
        return None
    formats = [f.strip() for v in values for f in v.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise RunError(f"unknown export format {bad[0] if bad else values!r} -> fix: use {' or '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def export(run_dir: Path, arms: list[str] | None, formats: list[str] | None = None, dtype: str | None = None,
           rank: int | None = None, step: int | None = None) -> int:
    """Rebuild each arm from its latest checkpoint (or the one of ``step``, written into
    <arm>/exports/step-N/) on the pristine base and write its adapter files (the config's export.formats /
    export.dtype unless given; ``rank``: a smaller SVD truncation)."""
    from fluxlora import families, modelpath
    from fluxlora.bench import open_run
    from fluxlora.errors import RunError

    group, cfg = open_run(run_dir)
    unknown = [a for a in arms or [] if a not in cfg.adapter.arms]
    if unknown:
        raise RunError(f"{run_dir} has no arm {unknown[0]!r} -> fix: choose from {', '.join(cfg.adapter.arms)}")
    from fluxlora.formats import for_family

    allowed = for_family(cfg.model.family)
    if formats and (bad := [f for f in formats if f not in allowed]):
        raise RunError(f"--format {bad[0]} is not available for the {cfg.model.family} family of {run_dir} -> fix: "
                       f"use {' or '.join(allowed)}")
    chosen = {name: _checkpoint(run_dir, group, name, step) for name in arms or cfg.adapter.arms}
    family = families.get(cfg.model.family)  # every arm's checkpoint was found before the base loads
    m = cfg.model
    model = family.denoiser(modelpath.load_base(family, m.path, m.dtype, m.revision, m.quantize))
    for name, ckpt in chosen.items():
        _export_arm(run_dir, group, cfg, family, model, name, formats, dtype, rank, ckpt, step)
    return 0


def _checkpoint(run_dir: Path, group, name: str, step: int | None) -> Path:
    from fluxlora import checkpoint
    from fluxlora.errors import RunError
    from fluxlora.rundir import step_name

    arm = group.arm(name)
    if step is None:
        ckpt = checkpoint.find(arm, "latest")
        if ckpt is None:
            raise RunError(f"arm {name} of {run_dir} has no complete checkpoint to export from")
        return ckpt
    if step not in arm.checkpoint_steps():
        have = ", ".join(map(str, arm.checkpoint_steps())) or "none"
        raise RunError(f"arm {name} of {run_dir} has no checkpoint at step {step} (it has: {have}) -> fix: choose "
                       "one of those; train.checkpoint_every and train.keep_checkpoints decide which are kept")
    return arm.checkpoints_dir / step_name(step)


def _export_arm(run_dir, group, cfg, family, model, name: str, formats, dtype, rank, ckpt: Path,
                step: int | None) -> None:
    from safetensors.torch import load_file

    from fluxlora import adapters
    from fluxlora import export as exporter
    from fluxlora.arms import export_metadata
    from fluxlora.config import arm_config
    from fluxlora.errors import RunError, write_errors

    arm, acfg = group.arm(name), arm_config(cfg, name)
    a = acfg.adapter
    scale = adapters.scale_for(a.rank, a.effective_alpha, a.scaling, a.alpha_coefficient)
    targets = adapters.find_targets(model, a.target_modules or family.target_presets[a.targets],
                                    blocks_only=not a.target_modules)
    info = adapters.inject(model, name, a.rank, scale, targets, skip_init=True, dora=a.dora)
    exact_rank = a.rank * (2 if info.has_offset else 1)
    if rank is not None and exact_rank <= rank:
        adapters.remove(model, info)
        print(f"{name}: its exact export is already rank {exact_rank} <= {rank}; nothing to truncate")
        return
    try:
        adapters.load_adapter_state(model, load_file(str(ckpt / "adapter.safetensors")))
        target = arm.step_export(step).create() if step is not None else arm
        at = int(ckpt.name.split("-")[1])
        paths, truncation, errors = exporter.export_arm(model, info, target, export_metadata(acfg, info, at), family,
                                                        formats or acfg.export.formats, dtype or acfg.export.dtype,
                                                        rank)
    except write_errors() as e:  # disk full, permissions: the previous files are left as they were
        raise RunError(f"could not write the export of arm {name}: {e} -> the previous files and the "
                       "checkpoints are kept; free disk space and run fluxlora export again") from e
    finally:
        adapters.remove(model, info)
    for path in paths:
        print(f"{name}: {path} (from {ckpt.name})")
    for path, line in exporter.cast_lines(errors):
        print(f"{name}: {path.name}: {line}")
    from fluxlora.formats import loader_warnings

    for line in loader_warnings(formats or acfg.export.formats, targets, acfg.model.family, acfg.adapter.dora):
        print(f"{name}: warning: {line}")
    if truncation is not None:
        layer, worst = truncation.worst
        print(f"{name}: rank {truncation.rank} relative error ||dW - dW_R||_F / ||dW||_F: overall "
              f"{truncation.overall:.3e}, max over layers {worst:.3e} ({layer})")


def sample(run_dir: Path, prompt: str, seed: int, steps: int | None, arm_name: str | None,
           out: str | None) -> int:
    """Generate through diffusers' own loader: the family pipeline + load_lora_weights(adapter.safetensors)."""
    from fluxlora.bench import AdapterBench

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

    from fluxlora.errors import RunError
    from fluxlora.export import read_metadata

    if not path.is_file():
        raise RunError(f"{path} is not a file -> fix: pass an exported adapter.safetensors")
    try:
        meta = read_metadata(path)
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise RunError(f"{path} is not a readable safetensors file ({e})") from e
    config = meta.pop("lora_config", {})
    targets = meta.pop("targets", None)
    for key in sorted(meta):
        print(f"{key:>14}: {meta[key]}")
    if targets is not None:
        inner = sorted({t.split(".", 2)[-1] if "blocks." in t else t for t in targets})
        print(f"{'targets':>14}: {len(targets)} modules ({', '.join(inner)})")
    short = {k.removeprefix("transformer."): v for k, v in config.items()}
    print(f"{'lora_config':>14}: " + json.dumps({k: short[k] for k in ("r", "lora_alpha", "use_rslora",
                                                                        "init_lora_weights") if k in short}))
    return 0
