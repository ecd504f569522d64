"""One arm's life on the shared prepared base, in order: check, inject (init, or the adapter.init_from
file, or the checkpoint to resume), train (train.py), export, remove. The runner calls `check_arm` for every
arm before any trains, then `train_arm` for each; the base is pristine again after each arm."""

from __future__ import annotations

import time

from fluxlora import adapters, buckets, checkpoint, export, lorafile, methods, train
from fluxlora.config import config_hash
from fluxlora.errors import AdapterError, TrainingStopped, write_errors
from fluxlora.prepare import Prepared
from fluxlora.rundir import ArmDir


def check_arm(prep: Prepared, cfg, method: str):
    """-> (target module names, the adapter.init_from file or None), refusing what cannot work before any
    training: a file that does not fit the arm, targets the export formats cannot hold, data the method's
    init cannot use."""
    a, model = cfg.adapter, prep.model
    targets = adapters.find_targets(model, a.target_modules or prep.family.target_presets[a.targets],
                                    blocks_only=not a.target_modules)
    export.check_formats(cfg.export.formats, targets, cfg.model.family)
    _check_rank_fits(model, targets, a.rank, method)
    m = methods.get(method)
    if m.check:
        t, members = cfg.train, [g.members.tolist() for g in prep.instance.groups]
        first = buckets.first_images(members, a.sb_batches, t.batch_size, cfg.data.repeats, t.seed)
        m.check_fn()(prep.stats["images"], a.sb_batches, t.batch_size, a.init_from, cfg.data.repeats, first)
    if a.init_from is None:
        return targets, None
    out_features = adapters.linear_out_features(model)
    start_file = lorafile.read(a.init_from, out_features, cfg.model.family)
    lorafile.check(start_file, a.rank, targets, m.start == methods.OFFSET, method, list(out_features))
    return targets, start_file


def _check_rank_fits(model, targets: list[str], rank: int, method: str) -> None:
    """Every init decomposes an (out, in) weight into rank-r factors: r <= min(out, in) on every target."""
    for name in targets:
        layer = model.get_submodule(name)
        n, m = layer.out_features, layer.in_features
        if rank > min(n, m):
            raise AdapterError(f"rank must be in [1, min(n, m)] = [1, {min(n, m)}] for {method} on a layer of shape "
                               f"(n={n}, m={m}), e.g. {name} (got {rank}) -> fix: use adapter.rank <= {min(n, m)} "
                               "or leave such layers out of the targets")


def storage_bytes(prep: Prepared, cfg, method: str, targets: list[str]) -> int:
    """About what an arm writes: each checkpoint holds the adapter tensors (with the offset half, fp32) and
    AdamW's two moments of the trainable ones; train.keep_checkpoints of them plus one being written, and the
    export files (each the exact delta, at most the adapter's size). Samples are small and not counted."""
    m, a = methods.get(method), cfg.adapter
    sizes = [(layer.in_features, layer.out_features) for layer in map(prep.model.get_submodule, targets)]
    per_rank = sum(i + o for i, o in sizes)  # A and B of one rank unit, over all targets
    trainable = a.rank * a.rank * len(sizes) if m.layer == methods.CORE else a.rank * per_rank
    trainable += sum(o for _, o in sizes) if a.dora else 0  # DoRA's magnitude: one value per output row
    frozen = a.rank * per_rank if (m.layer == methods.CORE or m.start == methods.OFFSET) else 0  # A, B or offset
    checkpoint = 4 * (frozen + trainable + 2 * trainable)  # the adapter, then AdamW's two moments
    export = 4 * a.rank * per_rank * (2 if m.start == methods.OFFSET else 1)  # rank 2r with an offset
    return checkpoint * (cfg.train.keep_checkpoints + 1) + export * len(cfg.export.formats)


def _inject(prep: Prepared, cfg, method: str, targets: list[str], start_file, resume_from,
            swap) -> adapters.AdapterInfo:
    """The arm's adapter. A data-driven init's pass runs first, with block swap's hooks on (the swapped blocks
    move in and out as in training); building the layers and weight-reading inits then read the swapped
    blocks' base weights where they wait (``swap.readable``)."""
    t, a, model = cfg.train, cfg.adapter, prep.model
    scale = adapters.scale_for(a.rank, a.effective_alpha, a.scaling, a.alpha_coefficient)
    fresh = resume_from is None and start_file is None
    t0 = time.perf_counter()
    done = train.init_passes(prep, cfg, method, targets) if fresh else {}
    passed = time.perf_counter() - t0
    inputs = adapters.InitInputs(done, first_lr=t.lr / max(1, t.warmup_steps))  # the first non-zero update's (methods.md 7.5)
    with swap.readable():
        info = adapters.inject(model, method, a.rank, scale, targets, dropout=a.dropout, seed=t.seed,
                               niter=a.pissa_niter, skip_init=not fresh, inputs=inputs, dora=a.dora)
        if start_file is not None and resume_from is None:
            adapters.load_factors(model, info, start_file.layers, start_file.offset)
            info.init_from = str(start_file.path)
    info.init_seconds += passed
    return info


def train_arm(prep: Prepared, cfg, method: str, arm: ArmDir) -> dict:
    """Train one arm (``cfg``: its arm config) to ``train.steps`` and export it; returns its summary.
    Resumes from a checkpoint when asked. The arm's adapters are always removed afterwards. With
    train.blocks_to_swap the last N blocks' frozen weights wait on the CPU for the whole arm and move in block by
    block (block_swap.py, docs/block_swap.md); they are back where they were when the arm ends."""
    from fluxlora import block_swap

    t, model, info = cfg.train, prep.model, None
    try:
        with block_swap.swapping(model, t.blocks_to_swap, prep.device, cfg.source) as swap:
            model.to(prep.device)  # all but the swapped blocks' weights (placeholders stand there)
            if prep.device.type == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats(prep.device)
            targets, start_file = check_arm(prep, cfg, method)
            resume_from = checkpoint.find(arm, t.resume)
            info = _inject(prep, cfg, method, targets, start_file, resume_from, swap)
            if t.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            t_start = train.train_loop(prep, t, cfg.sample, arm, info, resume_from, lr_ratio_b=cfg.adapter.lr_ratio_b,
                                       prior_weight=cfg.data.prior_loss_weight,
                                       resolution=cfg.sample.resolution or cfg.data.largest)
            with swap.readable():  # the export may read base weights (DoRA); the peak is still this arm's
                return _finish(prep, cfg, arm, info, t_start)
    finally:
        if info is not None:
            adapters.remove(model, info)
        if t.gradient_checkpointing:
            model.disable_gradient_checkpointing()


def export_metadata(cfg, info: adapters.AdapterInfo, steps: int) -> dict:
    d, m = cfg.data, cfg.model
    return export.metadata(base_model=m.path, revision=m.revision, family=m.family, method=info.method, info=info,
                           trigger=d.trigger or d.instance_prompt, steps=steps, config_hash=config_hash(cfg))


def _finish(prep: Prepared, cfg, arm: ArmDir, info: adapters.AdapterInfo, t_start: float) -> dict:
    """The main process exports the adapter; every process returns its summary."""
    if not prep.main:
        return {"arm": arm.name, "method": info.method, "rank": prep.process_index}
    steps = cfg.train.steps
    arm.set_status("running", step=steps, total=steps, method=info.method)
    export.sweep_partial(arm)  # temp files of an export a kill interrupted (the run lock: we are the only writer)
    try:
        _, _, errors = export.export_arm(prep.model, info, arm, export_metadata(cfg, info, steps), prep.family,
                                         cfg.export.formats, cfg.export.dtype)
    except write_errors() as e:
        raise TrainingStopped(f"could not write {arm.adapter_file}: {e} -> the final checkpoint is kept; "
                              f"free disk space and run: fluxlora export {arm.root.parent}") from e
    for path, line in export.cast_lines(errors):
        print(f"{arm.name}: {path.name}: {line}")
    summary = train.summarize(arm, info, time.perf_counter() - t_start, prep.device, cfg.train.lr)
    if errors:
        summary["export_cast_error"] = {p.name: {"overall": e[0], "worst": e[1][1]} for p, e in errors.items()}
    return summary
