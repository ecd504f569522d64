"""The training loop: explicit, top to bottom, on an arm whose adapter is already in place (arms.py owns
the arm's life around it). Functions take the prepared base and flat values or config sections, never the
whole run config."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fluxlora import (activations, adapters, buckets, captions, checkpoint, corda, distributed, gradients, initpass,
                      masks, methods, sampling, signals, validation)
from fluxlora.errors import CheckpointError, TrainingStopped, write_errors
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import denoiser_offloaded_for_decode
from fluxlora.prepare import Prepared
from fluxlora.rundir import ArmDir, write_json


class MetricsLog:
    """metrics.jsonl of an arm, mirrored to TensorBoard scalars when asked."""

    def __init__(self, arm: ArmDir, tensorboard: bool, enabled: bool = True):
        self.arm, self.writer, self.enabled = arm, None, enabled
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(arm.root / "tensorboard"))

    def __call__(self, record: dict) -> None:
        if not self.enabled:  # not the main process of a data-parallel run
            return
        try:
            self.arm.log_metrics(record)
        except write_errors() as e:
            raise TrainingStopped(f"could not write {self.arm.metrics_file}: {e} -> free disk space and resume "
                                  "with --resume (the last checkpoint is kept)") from e
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Batch:
    x0: torch.Tensor  # latents in the denoiser's layout (FLUX: packed [B, T, 4C])
    cond: Cond  # the family's text conditioning of these rows
    latent_hw: tuple[int, int]  # the latents' (h, w) before packing
    n_instance: int  # the first n rows are instance images, the rest prior-preservation images
    weights: torch.Tensor | None = None  # per-element loss weights in x0's layout (masked loss), None: uniform


def pick(cache, micro: int, batch_size: int, seed: int, gen: torch.Generator, bucket: int | None = None):
    """(bucket, latents, caption rows, masks) of micro-batch ``micro`` (buckets.micro_rows: every image
    ``cache.repeats`` times per epoch, a batch within one bucket); flip view, caption variant and caption
    dropout drawn from ``gen`` (the last two only when on). With ``bucket`` given: the stream of that bucket
    alone (prior images, cut to every instance bucket)."""
    if bucket is None:
        bucket, pos = buckets.micro_rows(cache.counts, micro, batch_size, cache.repeats, seed)
    else:
        pos = buckets.stream_rows(cache.counts[bucket], micro, batch_size, cache.repeats, seed)
    g, pos = cache.groups[bucket], torch.tensor(pos)
    view = torch.randint(0, g.latents.shape[1], (batch_size,), generator=gen)
    mask = g.masks[pos, view] if g.masks is not None else None
    caps = captions.pick(cache.caption_idx, g.members[pos], cache.dropout, cache.empty, gen)
    return bucket, g.latents[pos, view], caps, mask


def make_batch(prep: Prepared, micro: int, batch_size: int, seed: int, gen: torch.Generator) -> Batch:
    bucket, lat, cap, mask = pick(prep.instance, micro, batch_size, seed, gen)
    n = lat.shape[0]
    if prep.prior is not None:
        _, plat, pcap, _ = pick(prep.prior, micro, batch_size, seed + 1, gen, bucket)
        lat, cap = torch.cat([lat, plat]), torch.cat([cap, pcap])
        mask = torch.cat([mask, torch.ones_like(mask[:1]).expand(len(plat), -1, -1, -1)]) if mask is not None else None
    weights = None
    if mask is not None:  # class images are not masked
        w = masks.element_weights(mask, lat.shape[1], prep.instance.background_weight)
        weights = prep.family.pack(w.contiguous()).to(prep.device)
    return Batch(prep.family.pack(lat).to(prep.device), prep.text.select(cap), tuple(lat.shape[-2:]), n, weights)


def loss_step(prep: Prepared, model, batch: Batch, gen: torch.Generator, t, prior_weight: float):
    """The training loss of one micro-batch (``t``: the train section). Noise and sigmas come from the CPU
    generator ``gen``."""
    fam = prep.family
    b = batch.x0.shape[0]
    sigmas = fam.sample_sigmas(b, t.timestep_sampling, gen, t.logit_mean, t.logit_std, t.mode_scale, t.shift)
    noise = torch.randn(batch.x0.shape, generator=gen).to(batch.x0)
    rec = {"sigma_sum": float(sigmas.double().sum()), "noise_sum": float(noise.double().sum())}
    n = batch.n_instance
    if prep.num_processes > 1:  # every process drew the whole global batch; it computes its own share
        rows = distributed.share(n, b, prep.process_index, prep.num_processes)
        weights = batch.weights[rows] if batch.weights is not None else None
        batch = Batch(batch.x0[rows], batch.cond.select(rows), batch.latent_hw, n // prep.num_processes, weights)
        sigmas, noise, n, b = sigmas[rows], noise[rows], batch.n_instance, len(rows)
    sigmas = sigmas.to(batch.x0.device)
    xt, target = fam.noisy(batch.x0, noise, sigmas)
    cond = fam.condition(batch.cond, batch.latent_hw, t.guidance).to(batch.x0.device, prep.dtype)
    with prep.autocast():
        pred = fam.predict(model, xt.to(prep.dtype), sigmas, cond)
    err = (pred.float() - target.float()) ** 2
    per = err.mean(dim=tuple(range(1, pred.dim()))) if batch.weights is None else masks.weighted_mean(err, batch.weights)
    per = per * fam.loss_weights(t.loss_weighting, sigmas).float()
    loss = per[:n].mean()
    if n < b:
        loss = loss + prior_weight * per[n:].mean()
    return loss, rec


def make_optimizer(model, t, lr_ratio_b: float):
    groups = adapters.param_groups(model, t.lr, lr_ratio_b)
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def make_lr_scheduler(optimizer, t):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)


def sample_step(prep: Prepared, model, arm: ArmDir, step: int, s, resolution: int, log) -> None:
    """The fixed-seed sample grid of ``step`` (``s``: the sample section) and the evaluator's metrics."""
    if not prep.main:
        return
    model.eval()
    images, seeds = [], list(s.seeds)
    for i, _ in enumerate(prep.sample_prompts):
        cond = prep.sample_cond.select(slice(i, i + 1)).expand(len(seeds))
        with denoiser_offloaded_for_decode(prep.pipe, model, s.offload_base):
            images.append(prep.family.generate(prep.pipe, cond, prep.negative, seeds, resolution, s.steps,
                                               s.guidance, s.true_cfg))
    if prep.evaluator is not None:
        log({"step": step, **prep.evaluator.evaluate()})
    if prep.validation is not None:
        log({"step": step, **validation.evaluate(prep, model)})
    if prep.subject_metrics is not None:  # every sample image against the instance images and its prompt
        flat = [(img, p) for imgs, p in zip(images, prep.sample_prompts) for img in imgs]
        log({"step": step, **prep.subject_metrics.score([i for i, _ in flat], [p for _, p in flat])})
    model.train()
    settings = {"steps": s.steps, "guidance": s.guidance, "true_cfg": s.true_cfg,
                "negative_prompt": s.negative_prompt, "resolution": resolution}
    try:
        sampling.write_samples(arm, step, images, prep.sample_prompts, list(s.seeds), settings)
    except write_errors() as e:
        raise TrainingStopped(f"could not write the step-{step} samples into {arm.samples_dir}: {e} -> free "
                              "disk space and resume with --resume (the last checkpoint is kept)") from e


def due(step: int, every: int, last: int) -> bool:
    return step == 0 or step == last or (every > 0 and step % every == 0)


def gradient_pass(prep: Prepared, t, targets: list[str], batches: int, prior_weight: float) -> dict[str, torch.Tensor]:
    """The gradient pass of the data-driven inits (methods.py, needs GRADIENTS): the training loss's
    gradient wrt every target weight, summed over the first ``batches`` micro-batches. They are the
    micro-batches training starts with (same make_batch / loss_step, a generator seeded like training's):
    the same images, noise and sigmas."""
    model = prep.model
    gen, was_training = torch.Generator().manual_seed(t.seed), model.training
    model.train()
    with gradients.weight_gradients(model, targets) as grads:
        for micro in range(batches):
            batch = make_batch(prep, micro, t.batch_size, t.seed, gen)
            loss, _ = loss_step(prep, model, batch, gen, t, prior_weight)
            loss.backward()
    model.train(was_training)
    if prep.num_processes > 1:  # each process saw its share of every batch: their mean is one process's pass
        import torch.distributed as dist

        for g in grads.values():
            dist.all_reduce(g)
            g /= prep.num_processes
    return grads


def activation_pass(prep: Prepared, t, targets: list[str], batches: int, prior_weight: float, rows=None) -> dict:
    """The activation pass of the data-driven inits (methods.py, needs ACTIVATIONS): the moments of every
    target layer's input rows over the first ``batches`` micro-batches, the ones gradient_pass uses (same
    make_batch / loss_step and generator seeding: the same images, noise and sigmas). Forward only, no
    graph, in eval mode as peft's EVA runs its pass (FLUX and the other denoisers have no dropout, so the
    mode changes nothing there). Data-parallel: each process's rows, then the exact moments of all rows.
    ``rows``: a function cutting each micro-batch to the rows to read (corda.prior_rows), or None for all."""
    model = prep.model
    gen, was_training = torch.Generator().manual_seed(t.seed), model.training
    model.eval()
    try:
        with torch.no_grad(), activations.layer_inputs(model, targets) as stats:
            for micro in range(batches):
                batch = make_batch(prep, micro, t.batch_size, t.seed, gen)
                loss_step(prep, model, batch if rows is None else rows(batch), gen, t, prior_weight)
    finally:
        model.train(was_training)
    if prep.num_processes > 1:
        activations.combine(stats)
    return stats


def stat_passes(prep: Prepared, t, batches: int, prior_weight: float) -> dict[str, initpass.Pass]:
    """The data passes by methods.py ``needs`` kind, each run on a list of targets (initpass.py)."""
    def bound(fn):
        return lambda targets: fn(prep, t, targets, batches, prior_weight)
    return {methods.GRADIENTS: initpass.Pass(bound(gradient_pass), gradients.stat_bytes),
            methods.ACTIVATIONS: initpass.Pass(bound(activation_pass), activations.stat_bytes),
            methods.PRIOR_ACTIVATIONS: initpass.Pass(bound(corda.prior_activation_pass), activations.stat_bytes)}


def init_passes(prep: Prepared, cfg, method: str, targets: list[str]) -> dict:
    """adapters.InitInputs' passes for the arm (``cfg``: its arm config), run now, on the pristine base: the
    method's factors from its data pass, in memory-bounded chunks and shared with the run's other arms of the
    same pass (initpass.py). {} for a weight-reading init."""
    m = methods.get(method)
    if m.needs == methods.WEIGHTS:
        return {}
    t, a = cfg.train, cfg.adapter
    stat_pass = stat_passes(prep, t, a.sb_batches, cfg.data.prior_loss_weight)[m.needs]
    budget = int(a.init_pass_gb * initpass.GIB)

    data = prep.init_cache.factors(prep.model, initpass.request(cfg, method, targets), m.needs, stat_pass,
                                   targets, t.seed, budget)
    if prep.main:
        print(initpass.describe(method, data, len(targets), budget))
    return {m.needs: data}


def _start(prep, t, s, arm, info, resume_from, log, lr_ratio_b: float, resolution: int):
    """Optimizer, LR schedule and generator (restored when resuming) and the step-0 samples."""
    model = prep.model
    optimizer, gen = make_optimizer(model, t, lr_ratio_b), torch.Generator().manual_seed(t.seed)
    lr_scheduler = make_lr_scheduler(optimizer, t)
    start = 0
    if resume_from is not None:
        start = checkpoint.load(resume_from, model, optimizer, lr_scheduler, gen)["step"]
    if prep.main:
        arm.truncate_metrics(start)  # records of steps after the checkpoint (a killed attempt) are redone
        if resume_from is None:
            write_json(arm.init_file, init_record(info))
        arm.set_status("running", step=start, total=t.steps, method=info.method)
    if start == 0:
        sample_step(prep, model, arm, 0, s, resolution, log)
    model.train()
    return optimizer, lr_scheduler, gen, start


def accumulate(prep, t, prior_weight: float, model, step: int, gen, params) -> tuple[float, dict]:
    """Forward/backward over ``grad_accum`` micro-batches; returns the mean loss and draw checksums.
    In data-parallel runs the gradients and the loss are averaged over the processes."""
    loss_total, rec = 0.0, {}
    for micro in range(t.grad_accum):
        batch = make_batch(prep, step * t.grad_accum + micro, t.batch_size, t.seed, gen)
        loss, rec = loss_step(prep, model, batch, gen, t, prior_weight)
        (loss / t.grad_accum).backward()
        loss_total += loss.item() / t.grad_accum
    distributed.average_gradients(params, prep.num_processes)
    return distributed.mean_over_processes(loss_total, prep.device, prep.num_processes), rec


def train_loop(prep: Prepared, t, s, arm: ArmDir, info: adapters.AdapterInfo, resume_from, *, lr_ratio_b: float,
               prior_weight: float, resolution: int) -> float:
    """Train the injected arm from step 0 (or ``resume_from``) to ``t.steps`` (``t``/``s``: the train and
    sample sections); returns the time.perf_counter() at which it started (the arm's wall time counts from
    there to the end of its export)."""
    model, method = prep.model, info.method
    log = MetricsLog(arm, t.tensorboard, enabled=prep.main)
    optimizer, lr_scheduler, gen, start = _start(prep, t, s, arm, info, resume_from, log, lr_ratio_b, resolution)
    bad, done, t_start, last_status = 0, start, time.perf_counter(), time.monotonic()
    params = adapters.trainable_parameters(model)  # once: walking the module tree costs ms per step
    gen_state = gen.get_state()
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc=arm.name, dynamic_ncols=True,
               mininterval=0.5)
    try:
        for step in bar:
            t0, gen_state = time.perf_counter(), gen.get_state()
            loss_total, rec = accumulate(prep, t, prior_weight, model, step, gen, params)
            if not math.isfinite(loss_total):
                optimizer.zero_grad(set_to_none=True)  # the step is not applied
                bad, done = bad + 1, step + 1
                log({"step": done, "loss": None, "skipped": True})
                if bad >= t.max_bad_steps:
                    raise TrainingStopped(nonfinite_message(done, bad))
                continue
            bad = 0
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            with signals.deferred():  # the update and the step count change together
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                log({"step": done, "loss": loss_total, "lr": lr_scheduler.get_last_lr()[0],
                     "grad_norm": float(grad_norm), "clipped": clipped(grad_norm, t.max_grad_norm),
                     "step_time": time.perf_counter() - t0, "time": time.time(), **rec})
            bar.set_postfix(loss=f"{loss_total:.4f}", refresh=False)  # drawn at the bar's own interval
            if due(done, s.every, t.steps):
                sample_step(prep, model, arm, done, s, resolution, log)
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
                save_checkpoint(prep, arm, done, model, optimizer, lr_scheduler, gen, t.keep_checkpoints)
            if prep.main and time.monotonic() - last_status > 2.0:  # status.json is fsync'ed: not every step
                arm.set_status("running", step=done, total=t.steps, method=method)
                last_status = time.monotonic()
    except KeyboardInterrupt:
        # First Ctrl-C, SIGTERM or SIGUSR1 (signals.py): keep the work done so far (a second signal during the
        # save aborts it). A step cut short (no update applied) is redone on resume, so its draws are rewound.
        if done <= step:
            gen.set_state(gen_state)
        optimizer.zero_grad(set_to_none=True)
        try:
            save_checkpoint(prep, arm, done, model, optimizer, lr_scheduler, gen, t.keep_checkpoints)
        except TrainingStopped as e:  # the stop still stops the run; the earlier checkpoint is what resumes
            print(f"{arm.name}: {e}", file=sys.stderr)
        raise
    finally:
        bar.close()
        log.close()
    return t_start


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: CUDA allocations of this arm, or the process's peak RSS on CPU
    (which includes the arms before it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def clipped(grad_norm, max_norm: float | None) -> bool:
    """Whether clip_grad_norm_ scaled this step's gradient down (its norm was above train.max_grad_norm)."""
    return max_norm is not None and float(grad_norm) > max_norm


def summarize(arm: ArmDir, info: adapters.AdapterInfo, wall: float, device: torch.device, lr: float) -> dict:
    """The arm's summary; ``clip_fraction``: the share of its logged steps whose gradient was clipped (an arm
    clipped often trains at a smaller effective step than its lr says)."""
    records = arm.metrics()
    peak, kind = peak_memory_mb(device)
    flags = [r["clipped"] for r in records if "clipped" in r]
    return {"arm": arm.name, "method": info.method, "init_seconds": info.init_seconds,
            "trainable_params": info.trainable_params, "wall_seconds": wall, "lr": lr,
            "clip_fraction": sum(flags) / len(flags) if flags else None,
            "peak_memory_mb": peak, "peak_memory_kind": kind,
            "final_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
            "final_metrics": {**_last(records, "subject_fidelity"), **_last(records, "dino")},
            "final_validation": next((r for r in reversed(records) if any(k.startswith("val_") for k in r)), {})}


def _last(records: list[dict], key: str) -> dict:
    return next((r for r in reversed(records) if key in r), {})


def save_checkpoint(prep, arm, step, model, optimizer, lr_scheduler, gen, keep) -> None:
    if not prep.main:  # every process holds the same state: the main one's checkpoint resumes them all
        return
    try:
        checkpoint.save(arm, step, model, optimizer, lr_scheduler, gen, keep)
    except CheckpointError as e:
        raise TrainingStopped(str(e)) from e


def nonfinite_message(step: int, bad: int) -> str:
    return (f"loss was not finite for {bad} consecutive steps (last at step {step}); those steps were "
            "not applied. Likely causes: learning rate too high (try a lower train.lr), fp16 overflow "
            "(use model.dtype bf16 or fp32), or corrupt cached data. The last good checkpoint and "
            "samples are kept; resume with --resume after changing the config.")


def init_record(info: adapters.AdapterInfo) -> dict:
    return {"method": info.method, "rank": info.rank, "scale": info.scale, "init_seconds": info.init_seconds,
            "trainable_params": info.trainable_params, "has_offset": info.has_offset, "init_from": info.init_from,
            "layers": info.layers}
