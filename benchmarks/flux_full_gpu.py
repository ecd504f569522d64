"""Full-size FLUX.1-dev training step on one GPU, without downloads: memory and speed per configuration.

    python benchmarks/flux_full_gpu.py                       # everything (GPU; split it with the options)
    python benchmarks/flux_full_gpu.py --bases int8 --resolutions 1024 --methods loram
    python benchmarks/flux_full_gpu.py --tiny                # a small model on the CPU (CI keeps it working)

The transformer is FLUX.1-dev's architecture from its published config (19 double + 38 single blocks,
24 heads x 128, joint dim 4096, pooled 768, guidance embeds) with random weights, built on the meta device
and materialized directly on the GPU in bf16 (no 12B fp32 copy in host RAM). Each configuration trains
rank-16 adapters on the attention projections (the default `attn` preset) with cached-embedding-shaped
inputs (T5 512 tokens), batch 1: median s/it of the timed steps after warm-up, peak
`torch.cuda.max_memory_allocated` (weights included), adapter init time.

The compute floor is FLOPs / measured bf16 matmul throughput, with FLOPs counted by torch's
FlopCounterMode on one real step: forward + backward (activation gradients of the frozen layers and the
adapters' weight gradients) + one more forward when gradient checkpointing recomputes activations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
T5_TOKENS = 512


def build(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """FluxTransformer2DModel with random weights allocated once, on ``device``, in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # unit-variance activations: std 1/sqrt(fan_in)
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm scales
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


def inputs(config: dict, resolution: int, device, dtype, seed: int = 0) -> dict:
    from fluxlora.families import flux

    g = torch.Generator().manual_seed(seed)
    side = resolution // 16  # VAE /8, then 2x2 packing
    return dict(x0=torch.randn(1, side * side, config["in_channels"], generator=g).to(device, dtype),
                embeds=torch.randn(1, T5_TOKENS, config["joint_attention_dim"], generator=g).to(device, dtype),
                pooled=torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
                ids=flux.image_ids(side * 2, side * 2, device=device, dtype=dtype))


def step(model, batch: dict, opt) -> None:
    from fluxlora.families import flow
    from fluxlora.families.flux import FAMILY
    from fluxlora.families.interface import Cond

    sig = torch.rand(1, device=batch["x0"].device)
    noise = torch.randn_like(batch["x0"])
    xt, target = flow.noisy(batch["x0"], noise, sig.to(batch["x0"].dtype))
    cond = Cond({"embeds": batch["embeds"], "pooled": batch["pooled"]}, {"img_ids": batch["ids"], "guidance": 3.5})
    pred = FAMILY.predict(model, xt, sig, cond)
    loss = ((pred.float() - target.float()) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(model, batch: dict, opt, checkpointing: bool) -> float:
    """FLOPs of one training step as executed (checkpointing's recompute counted when on)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(model, batch, opt)
    return float(counter.get_total_flops())


def matmul_tflops(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def timed_steps(model, batch: dict, opt, args, device) -> list[float]:
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        step(model, batch, opt)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def kernel_kind(name: str) -> str:
    """matmul / attention / other, from a CUDA kernel's or an aten op's name."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    # cuBLAS on Hopper names its kernels nvjet_*; split-K reductions and gemv belong to the matmul too
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "gemv", "cublas", "splitkreduce",
                            "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")):
        return "matmul"
    return "other"


def profile_steps(model, batch: dict, opt, device, steps: int = 3) -> tuple[dict, str]:
    """Where a step's time goes: ms per step in matmul / attention / other (CUDA kernels on a GPU, aten
    ops' self time on the CPU), and torch.profiler's top-30 table."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step(model, batch, opt)
        sync(device)
    events = prof.key_averages()
    if cuda and not any(e.device_type == DeviceType.CUDA for e in events):
        raise RuntimeError("torch.profiler recorded no CUDA kernels (CUPTI unavailable?): no time split")
    split = dict.fromkeys(("matmul", "attention", "other"), 0.0)
    for e in events:
        if not cuda or e.device_type == DeviceType.CUDA:
            split[kernel_kind(e.key)] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return split, events.table(sort_by=sort, row_limit=30)


def measure(model, method: str, resolution: int, checkpointing: bool, args, config, device, dtype) -> dict:
    from fluxlora import adapters
    from fluxlora.families import flux

    targets = adapters.find_targets(model, flux.TARGET_PRESETS["attn"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    info = adapters.inject(model, method, args.rank, 1.0, targets, seed=0)
    try:
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-5)
        batch = inputs(config, resolution, device, dtype)
        try:
            s_per_it = statistics.median(timed_steps(model, batch, opt, args, device))
        except torch.OutOfMemoryError:  # recorded as a result: this setting does not fit on this GPU
            s_per_it, peak, flops, profiled = None, "OOM", None, (None, None)
        else:
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            # bitsandbytes' int8/nf4 kernels are invisible to the FLOP counter: the floor is for the full base
            flops = step_flops(model, batch, opt, checkpointing) if args.flops and not quantized(model) else None
            profiled = profile_steps(model, batch, opt, device) if args.profile else (None, None)
    finally:
        model.disable_gradient_checkpointing()
        adapters.remove(model, info)
    return {"method": method, "resolution": resolution, "checkpointing": checkpointing,
            "s_per_it": s_per_it, "peak_gib": peak, "init_s": info.init_seconds,
            "trainable_params": info.trainable_params, "step_tflop": None if flops is None else flops / 1e12,
            "profile_ms": profiled[0], "profile_table": profiled[1]}


def quantized(model) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def base_model(base: str, config: dict, device, dtype):
    """``full`` (the compute dtype), ``int8`` or ``nf4`` (bitsandbytes) base weights."""
    from fluxlora.quantize import quantize_transformer

    model = build(config, device, dtype)
    quantize_transformer(model, "none" if base == "full" else base, dtype)
    return model


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_row(r: dict) -> str:
    floor, s_per_it, peak = r["floor_s_per_it"], r["s_per_it"], r["peak_gib"]
    ratio = None if floor is None or s_per_it is None else s_per_it / floor
    peak = peak if isinstance(peak, str) else _fmt(peak, ".2f")  # "OOM": the setting did not fit
    return (f"| {r['base']} | {'on' if r['checkpointing'] else 'off'} | {r['resolution']} | {r['method']} | "
            f"{_fmt(s_per_it, '.3f')} | {_fmt(floor, '.3f')} | {_fmt(ratio, '.2f')} | {peak} | {r['init_s']:.2f} |")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small config on the CPU in fp32 (CI smoke mode)")
    ap.add_argument("--bases", default="full,int8,nf4", help="full = unquantized bf16 (tiny: fp32)")
    ap.add_argument("--methods", default="lora,pissa_fast,loram")
    ap.add_argument("--resolutions", default=None, help="default 512,1024 (tiny: 64)")
    ap.add_argument("--checkpointing", default="on,off")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    ap.add_argument("--jsonl", default=None, help="append every result as a JSON line here")
    ap.add_argument("--profile", default=None,
                    help="profile 3 more steps per setting; append the time split and top-op table to this file")
    return ap.parse_args(argv)


def target(tiny: bool):
    """(device, dtype, model config) of a run: the CPU smoke mode, or the GPU with the trainer's attention
    setting; None (said on stderr) without a GPU."""
    if not tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny for the CPU smoke mode", file=sys.stderr)
        return None
    device = torch.device("cpu" if tiny else "cuda")
    from fluxlora.prepare import avoid_cudnn_attention

    avoid_cudnn_attention(device)  # as the trainer does
    return device, torch.float32 if tiny else torch.bfloat16, TINY if tiny else FLUX_DEV


def main(argv=None) -> int:
    args = parse_args(argv)
    if (where := target(args.tiny)) is None:
        return 2
    device, dtype, config = where
    resolutions = [int(r) for r in (args.resolutions or ("64" if args.tiny else "512,1024")).split(",")]
    tflops = matmul_tflops(device, dtype, 1024 if args.tiny else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, {dtype}, measured matmul throughput {tflops:.1f} TFLOP/s")
    print("| base | ckpt | res | method | s/it | floor s/it | s/it / floor | peak GiB | init s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for base in args.bases.split(","):
        model = base_model(base, config, device, dtype)
        for res in resolutions:
            for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
                for method in args.methods.split(","):
                    r = measure(model, method, res, ckpt, args, config, device, dtype)
                    label = {"full": str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")}.get(base, base)
                    r.update(base=label, device=name, matmul_tflops=tflops, date=time.strftime("%Y-%m-%d"))
                    floor = r["step_tflop"] / tflops if r["step_tflop"] else None
                    r["floor_s_per_it"] = floor
                    print(table_row(r), flush=True)
                    table = r.pop("profile_table")
                    if args.profile and table:
                        with open(args.profile, "a") as f:
                            f.write(f"{table_row(r)}\nms per step: {r['profile_ms']}\n{table}\n")
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(r) + "\n")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
