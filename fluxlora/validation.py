"""Held-out validation loss, every family (docs/validation.md).

At every sample step each arm is scored, without gradients and in eval mode, on the SAME fixed tuples:
  - subject: held-out (image, caption) pairs (``data.validation.holdout`` instance images kept out of
    training, and/or the images of ``data.validation.dir``), each at ``sigmas`` noise levels spread evenly
    over the schedule (t_i = (i + 0.5) / S), with noise drawn once per run from ``train.seed``:
    ``val_loss_subject`` = the mean squared error of the training target (velocity, noise or v), unweighted;
  - prior: ``data.validation.prior_prompts`` (prompts without the subject), each on the base model's own
    image of that prompt, at the same levels: ``val_loss_prior`` = the mean squared difference between the
    arm's and the base model's predictions (0: the arm did not move the model there).
The base model's subject loss is measured once before any arm (``val_loss_subject_base``); an arm whose
adapter is still at its init (step 0 of every method but LoRA-SB) scores exactly that, and 0 on the prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fluxlora import buckets, data
from fluxlora.errors import DataError
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import on_device

NOISE_SEED = 7_919  # added to train.seed: the validation noise never shares a stream with training


@dataclass
class ValidationSet:
    latents: list[torch.Tensor]  # per item [1, C, h, w]: the held-out subject images, then the prior images
    n_subject: int
    text: Cond  # one row per item
    levels: torch.Tensor  # [S] noise levels t in (0, 1)
    noise: list[torch.Tensor] = field(default_factory=list)  # per item [S, C, h, w]
    guidance: float = 1.0
    base_prior: list[torch.Tensor] = field(default_factory=list)  # per prior item: the base's predictions
    base_subject: float | None = None  # the base model's val_loss_subject


def split_holdout(samples: list, n: int) -> tuple[list, list]:
    """(training samples, held-out samples): ``n`` images spread evenly over the folder's name order."""
    if n <= 0:
        return list(samples), []
    picked = {int((i + 0.5) * len(samples) / n) for i in range(n)}
    return ([s for i, s in enumerate(samples) if i not in picked], [s for i, s in enumerate(samples) if i in picked])


def held_out(cfg, samples: list[data.Sample], warn=print) -> tuple[list[data.Sample], list[data.Sample]]:
    """(training images, held-out images): data.validation.holdout of the instance images, plus the
    images of data.validation.dir."""
    v = cfg.data.validation
    if v.holdout and v.holdout >= len(samples):
        raise DataError(f"data.validation.holdout {v.holdout} would keep every one of the {len(samples)} usable "
                        f"images in {cfg.data.instance_dir} out of training -> fix: hold out at most "
                        f"{len(samples) - 1}, or give held-out images in data.validation.dir instead")
    train, held = split_holdout(samples, v.holdout)
    if v.dir:
        held += data.load_samples(v.dir, cfg.data.instance_prompt, warn=warn)
    if held:
        warn(f"validation: {len(held)} held-out image(s) ({', '.join(s.path.name for s in held[:5])}"
             f"{', ...' if len(held) > 5 else ''}), {len(v.prior_prompts)} prior prompt(s), {v.sigmas} noise levels")
    return train, held


def levels(count: int) -> torch.Tensor:
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def _layout(cfg, held: list[data.Sample]) -> buckets.Layout:
    """The held-out images' training sizes (the run's bucket rules); the items are its members in order."""
    return buckets.for_run(cfg.model, cfg.data, [s.image.size for s in held])


def texts(cfg, held: list[data.Sample]) -> list[str]:
    """What the validation items say, in item order: each held-out view's caption, then the prior prompts
    (the caller encodes them with the run's other texts)."""
    items = [held[i] for members in _layout(cfg, held).members for i in members] if held else []
    return [s.caption for s in items] + list(cfg.data.validation.prior_prompts)


def prior_latents(cfg, family, pipe, cond: Cond) -> list[torch.Tensor]:
    """The base model's image of each prior prompt (seed i, the sample settings), encoded back."""
    s, res, out = cfg.sample, cfg.data.largest, []
    for i in range(len(cond)):
        (img,) = family.generate(pipe, cond.select(slice(i, i + 1)), None, [i], res, s.steps, s.guidance, 1.0)
        out.append(family.encode_images(pipe, data.prepare_image(img, res)[None]))
    return out


def build(cfg, family, pipe, device, held: list[data.Sample], text: Cond | None) -> ValidationSet | None:
    """The run's validation tuples (None when data.validation asks for nothing); ``text``: the family's
    conditioning of ``texts(cfg, held)``."""
    v = cfg.data.validation
    if text is None:
        return None
    from fluxlora.prepare import training_views  # prepare builds the validation set: imported when called

    with on_device(device, pipe.vae):  # each held-out image centre-cut at each of its sizes, in item order
        subject = [family.encode_images(pipe, views) for _, _, views, _ in
                   training_views(held, _layout(cfg, held), True, False, cfg.train.seed)] if held else []
    prior = []
    if v.prior_prompts:
        with on_device(device, pipe.vae, family.denoiser(pipe)):
            prior = prior_latents(cfg, family, pipe, text.select(slice(len(subject), len(text))))
    vs = ValidationSet(subject + prior, len(subject), text, levels(v.sigmas), guidance=cfg.train.guidance)
    gen = torch.Generator().manual_seed(cfg.train.seed + NOISE_SEED)
    vs.noise = [torch.randn((v.sigmas, *x.shape[1:]), generator=gen) for x in vs.latents]
    return vs


@torch.no_grad()
def _predict(prep, model, vs: ValidationSet, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) of item i at every level, float32."""
    fam, s = prep.family, len(vs.levels)
    x0 = fam.pack(vs.latents[i].expand(s, -1, -1, -1)).to(prep.device)
    noise = fam.pack(vs.noise[i]).to(prep.device)
    t = vs.levels.to(prep.device)
    xt, target = fam.noisy(x0, noise, t)
    cond = fam.condition(vs.text.select([i] * s), tuple(vs.latents[i].shape[-2:]), vs.guidance)
    with prep.autocast():
        pred = fam.predict(model, xt.to(prep.dtype), t, cond.to(prep.device, prep.dtype))
    return pred.float(), target.float()


def _scores(prep, model, vs: ValidationSet) -> tuple[float | None, list[torch.Tensor]]:
    """(mean subject loss, the prior items' predictions), the model in eval mode for the call."""
    was = model.training
    model.eval()
    try:
        losses = [float(((p - t) ** 2).mean()) for p, t in (_predict(prep, model, vs, i) for i in range(vs.n_subject))]
        prior = [_predict(prep, model, vs, i)[0].cpu() for i in range(vs.n_subject, len(vs.latents))]
    finally:
        model.train(was)
    return (sum(losses) / len(losses) if losses else None), prior


def reference(prep) -> None:
    """The base model's scores, before any arm's adapter exists (the runner calls it once)."""
    vs = prep.validation
    vs.base_subject, vs.base_prior = _scores(prep, prep.model, vs)


def evaluate(prep, model) -> dict[str, float]:
    """The arm's validation metrics (metrics.jsonl keys)."""
    vs = prep.validation
    subject, prior = _scores(prep, model, vs)
    out = {}
    if subject is not None:
        out.update(val_loss_subject=subject, val_loss_subject_base=vs.base_subject)
    if prior:
        out["val_loss_prior"] = sum(float(((p - b) ** 2).mean()) for p, b in zip(prior, vs.base_prior)) / len(prior)
    return out
