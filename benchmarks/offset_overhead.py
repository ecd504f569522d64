"""Per-step cost of the offset methods' frozen init term: a PiSSA arm vs a LoRA arm of the same rank.

    python benchmarks/offset_overhead.py [--steps 30] [--repeats 5] [--threads 1] [--quick]

A training step (forward, backward, AdamW) of the same model, batch and rank with three adapter layers:
  lora       peft's LoRA layer, one rank-r branch (the lora / lora_gaussian arms)
  pissa      fluxlora's OffsetLinear: one branch of rank 2r, [B, -B0] [A; A0] (offset_layers.py)
  two-branch peft with a second frozen adapter holding (A0, -B0): how offset arms ran before
on two models: the shipped toy FLUX at 64 px with the `attn` preset, and the tiny random FLUX of the tests
with the `wide` preset (attention, context and MLP projections). The three kinds run interleaved, each
``--repeats`` times ``--steps`` steps; the table gives the median step time of each kind and its ratio to
lora (target: pissa within 5%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("lora", "pissa", "two-branch")


def two_branch(model, rank: int, targets: list[str]) -> None:
    """The former offset layout: peft's LoRA layer with a second, frozen adapter (init values don't matter)."""
    from fluxlora import adapters

    model.add_adapter(adapters.lora_config(rank, 1.0, targets, 0.0), adapter_name="subject")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        model.add_adapter(adapters.lora_config(rank, 1.0, targets, 0.0), adapter_name="offset")
    model.set_adapters(["subject", "offset"])
    adapters.PeftLayers.set_trainable(model)


def setup(model_path: str, preset: str, resolution: int, rank: int, kind: str):
    from fluxlora import adapters, modelpath
    from fluxlora.families.flux import FAMILY as flux

    pipe = modelpath.load_base(flux, model_path, "fp32", None, "none")
    model = pipe.transformer
    targets = adapters.find_targets(model, flux.target_presets[preset], blocks_only=True)
    if kind == "two-branch":
        two_branch(model, rank, targets)
    else:
        adapters.inject(model, kind, rank, 1.0, targets)
    model.train()
    c, h, w = flux.latent_shape(pipe, resolution)
    text = flux.encode_prompts(pipe, ["a zxq emblem on a red background, center"],
                               modelpath.max_sequence_length(flux, model_path, None))
    return flux, model, flux.pack(torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))), \
        flux.condition(text, (h, w), 1.0), len(targets)


def step_times(flux, model, x0, cond, steps: int) -> list[float]:
    from fluxlora import adapters
    from fluxlora.families import flow

    opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-4)
    gen, out = torch.Generator().manual_seed(1), []
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        sig = torch.rand(1, generator=gen)
        xt, target = flow.noisy(x0, torch.randn(x0.shape, generator=gen), sig)
        loss = ((flux.predict(model, xt, sig, cond) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out[3:]  # the first steps warm up allocator and kernels


def measure(model_path: str, preset: str, resolution: int, rank: int, steps: int, repeats: int) -> dict:
    built = {k: setup(model_path, preset, resolution, rank, k) for k in KINDS}
    medians = {k: [] for k in KINDS}
    for _ in range(repeats):  # interleaved, so machine load hits every kind alike
        for k in KINDS:
            flux, model, x0, cond, _ = built[k]
            medians[k].append(statistics.median(step_times(flux, model, x0, cond, steps)))
    return {"layers": built["lora"][4], **{k: statistics.median(v) for k, v in medians.items()},
            "spread": {k: (min(v), max(v)) for k, v in medians.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 steps, 1 repeat (CI keeps the script working)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, repeats = (2, 1) if args.quick else (args.steps, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}, {repeats} x {steps} steps")
    print("| model | preset | layers | lora s/step | pissa s/step | two-branch s/step | pissa / lora | "
          "two-branch / lora |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        from fluxlora.toy.tiny import build_tiny_flux

        tiny = str(build_tiny_flux(Path(d) / "tiny"))
        for label, path, preset, res in (("toy", "toy", "attn", 64), ("tiny", tiny, "wide", 32)):
            r = measure(path, preset, res, args.rank, steps, repeats)
            print(f"| {label} | {preset} | {r['layers']} | {r['lora']:.4f} | {r['pissa']:.4f} | {r['two-branch']:.4f} "
                  f"| {r['pissa'] / r['lora']:.3f} | {r['two-branch'] / r['lora']:.3f} |")


if __name__ == "__main__":
    main()
