"""`fluxlora train CONFIG --dry-run [--dump-dataset DIR]`: everything a run checks before it loads a model,
and exactly what it would train on, without loading any model weights.

Prints the checks' outcome, each training image with its caption and size, the class images and the run
folder; with ``--dump-dataset`` writes each image as the trainer will see it (resized, cropped with the run's
seed, mirrored too with data.random_flip) as PNG, with its caption and source beside it. Exit 0 only when a
real run would start; the checks that need the loaded model (target names, layer shapes, an init_from file's
fit) run when training starts, before any arm trains."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from fluxlora import buckets, data, preflight, validation
from fluxlora.errors import RunError
from fluxlora.rundir import write_json


def _check_run_folder(cfg, resume: bool) -> Path:
    root = Path(cfg.output_dir) / cfg.name
    if (root / "group.json").exists() and not resume:
        raise RunError(f"{root} already holds a run -> fix: pass --resume to continue it, or choose another name "
                       "(name=... on the command line)")
    return root


def dump_dataset(samples: list[data.Sample], out: Path, layout: buckets.Layout, center_crop: bool, flip: bool,
                 seed: int) -> int:
    """Each sample at each of its training sizes as the trainer caches it (prepare.training_views, the
    trainer's own preprocessing)."""
    from fluxlora.prepare import training_views

    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for b, i, views, _ in training_views(samples, layout, center_crop, flip, seed):
        s, (w, h) = samples[i], layout.sizes[b]
        for tag, view in zip(("", "_flip"), views):
            name = f"{i:04d}_{s.path.stem}_{w}x{h}{tag}.png"
            arr = ((view.permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
            Image.fromarray(arr).save(out / name)
            (out / name).with_suffix(".txt").write_text(s.caption + "\n", encoding="utf-8")
            manifest.append({"file": name, "source": str(s.path), "caption": s.caption, "size": [w, h]})
    write_json(out / "manifest.json", manifest)
    return len(manifest)


def dry_run(cfg, resume: bool, dump: str | None, say=print) -> int:
    preflight.check(cfg)  # data, paths, output folder, init_from, method data checks: all at once
    root = _check_run_folder(cfg, resume)
    d = cfg.data
    samples = data.load_samples(d.instance_dir, d.instance_prompt, recursive=d.recursive, alpha_mask=d.alpha_mask,
                                warn=say)
    samples, _ = validation.held_out(cfg, samples, say)
    say(f"{len(samples)} training images (data.repeats {d.repeats}, resolution {d.resolution}):")
    for s in samples:
        say(f"  {s.path}  {s.image.size[0]}x{s.image.size[1]}  {json.dumps(s.caption)}")
    layout = buckets.for_run(cfg.model, d, [s.image.size for s in samples])
    say(f"{len(layout.sizes)} training size(s) (width x height: images):")
    for line in layout.table() + layout.warnings([s.path.name for s in samples], cfg.train.batch_size):
        say(line)
    if d.class_prompt:
        have = len(list(Path(d.class_dir).glob("*"))) if d.class_dir and Path(d.class_dir).is_dir() else 0
        say(f"class images: {have} in {d.class_dir or '(generated into the run folder)'}, up to "
            f"{d.num_class_images} generated, caption {json.dumps(d.class_prompt)}")
    if dump:
        try:
            n = dump_dataset(samples, Path(dump), layout, d.center_crop, d.random_flip, cfg.train.seed)
        except OSError as e:
            raise RunError(f"could not write --dump-dataset {dump}: {e.strerror or e} -> fix: give a writable "
                           "folder") from e
        say(f"wrote {n} preprocessed images with captions and manifest.json to {dump}")
    say(f"arms: {', '.join(cfg.adapter.arms)}; run folder: {root}")
    say("dry run: every check that needs no model passed; target names, layer shapes and an init_from file's "
        "fit are checked when training starts, before any arm trains")
    return 0
