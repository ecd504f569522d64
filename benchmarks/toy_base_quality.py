"""Quality of the toy base model: detector accuracy on 200 held-out prompt/seed pairs.

    python benchmarks/toy_base_quality.py [--model toy] [--n 200] [--device cpu]

Default sampling settings are the ones shipped with the model (fluxlora_toy.json). Targets (issue):
background colour >= 90%, object colour >= 80%, shape >= 70%, position >= 70%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"bg": 0.90, "color": 0.80, "shape": 0.70, "pos": 0.70}


def main() -> None:
    from fluxlora import modelpath
    from fluxlora.families.flux import FAMILY as flux
    from fluxlora.toy import detect, world

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save-grid", default=None, help="write the first 32 samples as a PNG grid")
    args = ap.parse_args()
    pipe = modelpath.load_base(flux, args.model, "fp32", None, "none")
    pipe.to(args.device)
    defaults = modelpath.toy_defaults(args.model)
    pairs = world.heldout(args.n)
    t0 = time.time()
    images = []
    neg = flux.encode_prompts(pipe, [""], defaults["max_sequence_length"])
    for i in range(0, len(pairs), 50):
        chunk = pairs[i:i + 50]
        emb = flux.encode_prompts(pipe, [p for _, p, _ in chunk], defaults["max_sequence_length"])
        images += flux.generate(pipe, emb, neg, [s for *_, s in chunk], resolution=64,
                                steps=defaults["steps"], guidance=3.5, true_cfg=defaults["true_cfg"])
    import numpy as np

    arrays = [np.asarray(im) for im in images]
    acc = detect.accuracy(zip([s for s, _, _ in pairs], arrays))
    print(f"model={args.model} n={args.n} steps={defaults['steps']} true_cfg={defaults['true_cfg']} "
          f"device={args.device} generation {time.time() - t0:.0f}s")
    print("| attribute | accuracy | target | |\n|---|---:|---:|---|")
    for key in ("bg", "color", "shape", "pos", "size"):
        target = TARGETS.get(key)
        mark = "" if target is None else ("pass" if acc[key] >= target else "FAIL")
        print(f"| {key} | {acc[key]:.3f} | {'' if target is None else f'{target:.2f}'} | {mark} |")
    found = [detect.detect(a) for a in arrays]
    swaps = sum(d.bg == s.color and d.color == s.bg for d, (s, _, _) in zip(found, pairs))
    print(f"background/object colour swapped (word order lost): {swaps}/{len(pairs)}")
    if args.save_grid:
        from PIL import Image

        grid = Image.new("RGB", (64 * 8, 64 * 4))
        for k, im in enumerate(images[:32]):
            grid.paste(im, ((k % 8) * 64, (k // 8) * 64))
        grid.save(args.save_grid)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
