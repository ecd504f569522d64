"""Aspect-ratio buckets vs square crops on the toy model: latent caching cost per bucket and training step time.

    python benchmarks/buckets.py [--steps 40] [--repeats 3] [--resolution 64] [--threads 1] [--quick]

The data are scikit-image's sample photos (a dev dependency, shipped in its wheel) cut to portrait,
landscape and square, resized to 1.5x the training side. Caching: the VAE encodes of each bucket's images
(and their mirrors), timed per bucket and per image, against the same images cropped square. Step time:
the median `step_time` of metrics.jsonl (batch assembly, loss, backward, clipping, optimizer) of the same
run with buckets on and off, run alternately ``--repeats`` times; the medians of the repeats are reported
with their spread. The toy model's bucket sizes hold about as many latent tokens as its square, so equal
step times mean buckets cost nothing per step; the table says how many tokens each size has.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = [("astronaut", (110, 0, 410, 512)), ("coffee", None), ("chelsea", None), ("rocket", (180, 0, 460, 427)),
          ("hubble_deep_field", (0, 0, 872, 872)), ("camera", (0, 96, 512, 416)), ("immunohistochemistry", None),
          ("cat", (0, 0, 240, 300))]


def write_photos(folder: Path, side: int) -> None:
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    for name, box in PHOTOS:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img = img.crop(box) if box else img
        scale = side * 1.5 / min(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS).save(
            folder / f"{name}.png")


def config(tmp: Path, bucketed: bool, steps: int, resolution: int, name: str):
    from fluxlora.config import parse_config

    return parse_config({
        "name": name, "output_dir": str(tmp / "runs"), "model": {"path": "toy"},
        "data": {"instance_dir": str(tmp / "photos"), "instance_prompt": "a photo of zxq", "resolution": resolution,
                 "buckets": bucketed, "random_flip": True},
        "adapter": {"init": "lora", "rank": 8},
        "train": {"steps": steps, "checkpoint_every": 0, "lr": 1.0e-4, "seed": 0},
        "sample": {"every": 0, "steps": 2, "seeds": [0]},
    })


def caching_rows(tmp: Path, resolution: int, repeats: int) -> list[tuple]:
    """(size, images, tokens, ms per image) per bucket, then the square crop of every image."""
    from fluxlora import buckets, data, modelpath
    from fluxlora.families.flux import FAMILY as flux
    from fluxlora.prepare import encode_groups

    pipe = modelpath.load_base(flux, "toy", "fp32", None, "none")
    samples = data.load_samples(tmp / "photos", "a photo of zxq", warn=lambda m: None)
    cfg = config(tmp, True, 1, resolution, "x")
    layouts = [buckets.for_run(cfg.model, cfg.data, [s.image.size for s in samples]),
               buckets.layout([s.image.size for s in samples], [resolution], 16, bucketed=False)]
    rows, f = [], flux.pixel_multiple(pipe)
    for lay in layouts:
        for size, members in zip(lay.sizes, lay.members):
            one = buckets.Layout((size,), (members,))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                encode_groups(flux, pipe, samples, one, True, True, 0)
                times.append(time.perf_counter() - t0)
            tokens = (size[0] // f) * (size[1] // f)
            rows.append((size, len(members), tokens, 1000 * statistics.median(times) / len(members), lay is layouts[1]))
    return rows


def step_time(tmp: Path, bucketed: bool, steps: int, resolution: int, k: int) -> float:
    from fluxlora.rundir import GroupDir
    from fluxlora.runner import run

    name = f"{'buckets' if bucketed else 'square'}_{k}"
    run(config(tmp, bucketed, steps, resolution, name), warn=lambda m: None)
    recs = [r for r in GroupDir(tmp / "runs" / name).arm("lora").metrics() if "step_time" in r]
    return statistics.median(r["step_time"] for r in recs[min(5, len(recs) - 1):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 repeat (CI keeps the script working)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; toy model at {args.resolution} px, "
          f"{len(PHOTOS)} photos, flips on")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_photos(tmp / "photos", args.resolution)
        print("\n| size | kind | images | latent tokens | caching ms / image (with its mirror) |\n|---|---|---|---|---|")
        for size, n, tokens, ms, square in caching_rows(tmp, args.resolution, repeats):
            print(f"| {size[0]}x{size[1]} | {'square crop' if square else 'bucket'} | {n} | {tokens} | {ms:.1f} |")
        times = {True: [], False: []}
        for k in range(repeats):  # alternate, so machine load hits both alike
            for bucketed in (False, True):
                times[bucketed].append(step_time(tmp, bucketed, steps, args.resolution, k))
        print(f"\n| data | median step s ({repeats} runs x {steps} steps) | min | max |\n|---|---|---|---|")
        for bucketed in (False, True):
            t = times[bucketed]
            print(f"| {'buckets' if bucketed else 'square'} | {statistics.median(t):.4f} | {min(t):.4f} | {max(t):.4f} |")
        ratio = statistics.median(times[True]) / statistics.median(times[False])
        print(f"\nbuckets / square step time: {ratio:.3f}")


if __name__ == "__main__":
    main()
