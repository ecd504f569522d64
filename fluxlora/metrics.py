"""Per-step evaluation. On the toy world every number is exact (detectors, not learned models):

- subject_fidelity: best-alignment match of the generated image to the subject template, 0 = no better
  than plain background, 1 = the template exactly (trigger prompts, held-out backgrounds/positions);
- prompt_fidelity: share of requested backgrounds and positions honoured on those trigger prompts;
- prior_accuracy (vs prior_accuracy_base): detector accuracy on world prompts without the trigger, and
  prior_drift_px: mean absolute pixel distance (0..255) to the base model's output at the same seed.

Real model families have no exact detectors: they get no fidelity metrics (the evaluator is None).
"""

from __future__ import annotations

import numpy as np

from fluxlora.toy import detect, subject, world

# Trigger prompts on background/position pairs that are not in the training set.
EVAL_SUBJECT = (("red", "center"), ("cyan", "top right"), ("magenta", "bottom left"), ("white", "left"))
EVAL_SEEDS = (0, 1)
N_WORLD = 8


PHASES = (0.0, 0.5)  # sub-pixel placements: the stripes are ~2.5 px wide


def best_alignment(img: np.ndarray) -> tuple[float, tuple[int, int]]:
    """(subject fidelity, centre (y, x) of the best-matching placement of the template).

    Error = coverage-weighted mean absolute colour difference to the template over the best placement
    (every integer offset x sub-pixel phase); fidelity = 1 - error / error of a plain-background patch."""
    import torch
    import torch.nn.functional as F

    res = img.shape[0]
    bg = detect.background(img)
    pad = res // 4  # the emblem may sit partly outside the frame: pad with the background colour
    x = torch.empty(3, res + 2 * pad, res + 2 * pad)
    x[:] = torch.from_numpy(bg)[:, None, None]
    x[:, pad:pad + res, pad:pad + res] = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)
    best = (np.inf, 0.0, (0, 0))
    for py in PHASES:
        for px in PHASES:
            rgb_t, cover_t = subject.template(res, (py, px))
            k = rgb_t.shape[0]
            w = torch.from_numpy(cover_t ** 2 / (cover_t ** 2).sum()).reshape(-1, 1)  # interior counts most
            t = torch.from_numpy(rgb_t).permute(2, 0, 1).reshape(3, -1, 1)
            windows = F.unfold(x[None], k)[0].reshape(3, k * k, -1)  # [3, k*k, placements]
            err = ((windows - t).abs().mean(0) * w).sum(0)
            i = int(torch.argmin(err))
            if float(err[i]) < best[0]:
                side = x.shape[1] - k + 1
                oy, ox = divmod(i, side)
                base_err = float((np.abs(bg - rgb_t).mean(-1) * (cover_t ** 2 / (cover_t ** 2).sum())).sum())
                best = (float(err[i]), base_err, (int(oy + k / 2 + py) - pad, int(ox + k / 2 + px) - pad))
    score = float(np.clip(1.0 - best[0] / max(best[1], 1e-6), 0.0, 1.0))
    return score, best[2]


def prompt_honoured(img: np.ndarray, bg: str, pos: str, centre: tuple[int, int] | None = None) -> float:
    """0.5 for the requested background + 0.5 for the subject in the requested grid cell."""
    res = img.shape[0]
    cy, cx = centre if centre is not None else best_alignment(img)[1]
    row, col = min(max(int(cy * 3 / res), 0), 2), min(max(int(cx * 3 / res), 0), 2)
    got_bg = detect.nearest(detect.background(img))
    return 0.5 * (got_bg == bg) + 0.5 * (world.POSITIONS[row * 3 + col] == pos)


class ToyEvaluator:
    """Generates the evaluation images with the current model and scores them."""

    def __init__(self, family, pipe, max_len: int, resolution: int, steps: int, guidance: float,
                 true_cfg: float):
        self.family, self.pipe = family, pipe
        self.settings = dict(resolution=resolution, steps=steps, guidance=guidance, true_cfg=true_cfg)
        self.subject_prompts = [(subject.subject_caption(bg, pos), bg, pos, seed)
                                for bg, pos in EVAL_SUBJECT for seed in EVAL_SEEDS]
        self.world = world.heldout(N_WORLD)
        prompts = [p for p, *_ in self.subject_prompts] + [p for _, p, _ in self.world]
        self.cond = family.encode_prompts(pipe, prompts, max_len)
        self.negative = family.encode_prompts(pipe, [""], max_len)
        self.base_world = self._world_images()  # the pristine base: computed before any adapter

    def _generate(self, offset: int, seeds: list[int]) -> list[np.ndarray]:
        cond = self.cond.select(slice(offset, offset + len(seeds)))
        images = self.family.generate(self.pipe, cond, self.negative, seeds, **self.settings)
        return [np.asarray(im) for im in images]

    def _world_images(self) -> list[np.ndarray]:
        return self._generate(len(self.subject_prompts), [seed for *_, seed in self.world])

    def evaluate(self) -> dict[str, float]:
        subj = self._generate(0, [seed for *_, seed in self.subject_prompts])
        aligned = [best_alignment(im) for im in subj]
        fid = [score for score, _ in aligned]
        honoured = [prompt_honoured(im, bg, pos, centre) for im, (_, centre), (_, bg, pos, _)
                    in zip(subj, aligned, self.subject_prompts)]
        world_now = self._world_images()
        acc = detect.accuracy((scene, im) for im, (scene, _, _) in zip(world_now, self.world))
        acc_base = detect.accuracy((scene, im) for im, (scene, _, _) in zip(self.base_world, self.world))
        drift = np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(world_now, self.base_world)])
        keys = ("bg", "color", "shape", "pos")
        return {"subject_fidelity": float(np.mean(fid)), "prompt_fidelity": float(np.mean(honoured)),
                "prior_accuracy": float(np.mean([acc[k] for k in keys])),
                "prior_accuracy_base": float(np.mean([acc_base[k] for k in keys])),
                "prior_drift_px": float(drift)}
