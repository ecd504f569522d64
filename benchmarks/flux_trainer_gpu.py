"""`fluxlora train` itself, end to end, on a full-size FLUX.1-dev-architecture pipeline with random weights
built on the GPU (nothing downloaded): quantized base, gradient checkpointing, three arms, samples at step 0
and at the end, a checkpoint and the exports. Per arm: init time, s/it, the arm's peak
`max_memory_allocated` (init, training and its samples); for the whole process: the peak over every phase
(caption caching, the arms, export), allocated and reserved.

    python benchmarks/flux_trainer_gpu.py --out /tmp/fluxfull                 # int8, 1024 px, 30 steps
    python benchmarks/flux_trainer_gpu.py --out /tmp/fluxfull --bases int8,nf4 --jsonl results.jsonl
    python benchmarks/flux_trainer_gpu.py --tiny --out /tmp/fluxtiny          # CPU smoke: the same flow, tiny

The pipeline (transformer 11.9 B, T5-XXL encoder 4.8 B, CLIP-L, FLUX VAE; tokenizers are the toy world's,
built offline, with the real vocabulary sizes in the encoders) is written once to OUT/pipeline, in bf16
(~34 GB), and reused by later calls; every run is resumable (`--resume`), so a call cut short by a time
limit continues where it stopped. Targets (issue 22): int8 <= 16 GiB, nf4 <= 10 GiB during training at
1024 px, batch 1, checkpointing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("lora", "pissa", "loram")
TARGET_GIB = {"int8": 16.0, "nf4": 10.0}
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
# Runs `fluxlora train` and reports the process's CUDA peaks: the trainer resets the peak at each arm's start,
# so the largest value seen before every reset is kept.
WRAPPER = """import json, sys, torch
peaks = {"allocated": 0, "reserved": 0}
def note():
    if torch.cuda.is_available():
        peaks["allocated"] = max(peaks["allocated"], torch.cuda.max_memory_allocated())
        peaks["reserved"] = max(peaks["reserved"], torch.cuda.max_memory_reserved())
reset = torch.cuda.reset_peak_memory_stats
def noted_reset(*a, **k):
    note()
    return reset(*a, **k)
torch.cuda.reset_peak_memory_stats = noted_reset
from fluxlora.cli import main
rc = main(sys.argv[1:])
note()
print("PROCESS_PEAKS", json.dumps(peaks), flush=True)
sys.exit(rc)
"""


def random_init(model, seed: int = 0):
    """Weights with unit-variance activations (std 1/sqrt(fan_in)), biases 0, norm scales 1: a random model
    whose forward stays finite through 57 blocks, in place, on the model's device."""
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.eval()


def on_device(make, device, dtype):
    """``make()`` built on the meta device in ``dtype``, then allocated on ``device`` and initialized."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = make()
    finally:
        torch.set_default_dtype(default)
    return random_init(model.to_empty(device=device))


def sizes(tiny: bool) -> dict:
    """Module configs: FLUX.1-dev's (transformer, CLIP ViT-L/14 text, T5-v1.1-XXL encoder, VAE), or small ones
    of the same architecture wired the same way (tiny: the CPU smoke mode runs this very build code)."""
    import flux_full_gpu
    from fluxlora.toy import build

    if tiny:
        return {"transformer": flux_full_gpu.TINY, "vae": build.VAE_CONFIG,
                "clip": dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, projection_dim=16),
                "t5": dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)}
    return {"transformer": flux_full_gpu.FLUX_DEV, "vae": FLUX_VAE,
            "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, projection_dim=768),
            "t5": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)}


def encoders(size: dict, clip_vocab: int):
    """The two text encoders' configs; the toy tokenizers' special ids (their vocabularies are smaller)."""
    from transformers import CLIPTextConfig, T5Config

    clip = CLIPTextConfig(**size["clip"], max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1)
    t5 = T5Config(**size["t5"], relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return clip, t5


def build_pipeline(out: Path, tiny: bool) -> Path:
    """OUT/pipeline, built once on the GPU in bf16 (tiny: the CPU), written through a partial folder renamed at
    the end; a finished folder is reused."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    import flux_full_gpu
    from fluxlora.toy import build

    path = out / "pipeline"
    if (path / "model_index.json").is_file():
        return path
    partial, size = out / "pipeline.partial", sizes(tiny)
    shutil.rmtree(partial, ignore_errors=True)
    build.write_clip_tokenizer(partial / "tokenizer")
    build.write_t5_tokenizer(partial / "tokenizer_2")
    clip_tok = CLIPTokenizer.from_pretrained(partial / "tokenizer")
    clip_cfg, t5_cfg = encoders(size, len(clip_tok))
    device, dtype = torch.device("cpu" if tiny else "cuda"), torch.bfloat16
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=on_device(lambda: AutoencoderKL(**size["vae"]), device, dtype),
        text_encoder=on_device(lambda: CLIPTextModel(clip_cfg), device, dtype), tokenizer=clip_tok,
        text_encoder_2=on_device(lambda: T5EncoderModel(t5_cfg), device, dtype),
        tokenizer_2=T5TokenizerFast.from_pretrained(partial / "tokenizer_2"),
        transformer=flux_full_gpu.build(size["transformer"], device, dtype))
    pipe.save_pretrained(partial)
    del pipe
    partial.rename(path)
    return path


def subject(out: Path, resolution: int, n: int = 4) -> Path:
    """``n`` synthetic subject photos (a coloured disc on a gradient) with captions."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = out / "subject"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ramp = np.linspace(40, 215, resolution, dtype=np.uint8)
        img = Image.fromarray(np.stack([np.tile(ramp, (resolution, 1)), np.tile(ramp[:, None], (1, resolution)),
                                        np.full((resolution, resolution), 60 * i, np.uint8)], -1))
        r = resolution // 4
        c = resolution // 2 + (i - 1.5) * resolution // 8
        ImageDraw.Draw(img).ellipse((c - r, c - r, c + r, c + r), fill=(200, 30, 30))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a photo of sks toy")
    return folder


def run_config(args, pipe: Path, data: Path, base: str) -> dict:
    tiny = args.tiny
    return {"name": f"{base}_{args.resolution}px", "output_dir": str(args.out / "runs"),
            "model": {"path": str(pipe), "dtype": "fp32" if tiny else "bf16", "quantize": base,
                      "max_sequence_length": 24 if tiny else 512},
            "data": {"instance_dir": str(data), "resolution": args.resolution, "buckets": False},
            "adapter": {"init": list(ARMS), "rank": args.rank},
            "train": {"steps": args.steps, "lr": 1.0e-4, "guidance": 1.0, "gradient_checkpointing": True,
                      "mixed_precision": "no" if tiny else "bf16", "checkpoint_every": args.steps, "seed": 0},
            "sample": {"every": 0, "steps": args.sample_steps, "seeds": [0], "prompts": ["a photo of sks toy"]}}


def train(args, pipe: Path, data: Path, base: str) -> tuple[Path, dict]:
    """Run (or resume) `fluxlora train` for one base; the run folder and the process's CUDA peaks."""
    import yaml

    cfg = run_config(args, pipe, data, base)
    path = args.out / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = args.out / "runs" / cfg["name"]
    cmd = [sys.executable, "-c", WRAPPER, "train", str(path), *(["--resume"] if (run / "group.json").exists() else [])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fluxlora train ({base}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROCESS_PEAKS"))
    return run, json.loads(line.split(" ", 1)[1])


def arm_rows(run: Path, base: str, peaks: dict) -> list[dict]:
    """Per arm: init s, median s/it (steps after the first two), the arm's peak; the process's peaks."""
    rows = []
    for arm in ARMS:
        summary = json.loads((run / arm / "status.json").read_text())["summary"]
        times = [r["step_time"] for r in map(json.loads, (run / arm / "metrics.jsonl").read_text().splitlines())
                 if r.get("step_time") is not None and r["step"] > 2]
        rows.append({"base": base, "arm": arm, "init_s": summary["init_seconds"],
                     "s_per_it": statistics.median(times) if times else None,
                     "arm_peak_gib": summary["peak_memory_mb"] / 1024, "peak_kind": summary["peak_memory_kind"],
                     "process_peak_alloc_gib": peaks["allocated"] / 2**30,
                     "process_peak_reserved_gib": peaks["reserved"] / 2**30,
                     "exports": sorted(p.name for p in (run / arm).glob("*.safetensors"))})
    return rows


def table(rows: list[dict], resolution: int) -> str:
    out = ["| base | arm | init s | s/it | arm peak GiB | whole run: allocated / reserved GiB | target |",
           "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        need = TARGET_GIB.get(r["base"])
        verdict = "-" if need is None or resolution != 1024 else (
            f"{'PASS' if r['arm_peak_gib'] <= need else 'FAIL'} <= {need:g} GiB")
        s_it = "-" if r["s_per_it"] is None else f"{r['s_per_it']:.3f}"
        rss = "" if r["peak_kind"].startswith("cuda") else " (CPU RSS)"
        out.append(f"| {r['base']} | {r['arm']} | {r['init_s']:.2f} | {s_it} | {r['arm_peak_gib']:.2f}{rss} | "
                   f"{r['process_peak_alloc_gib']:.2f} / {r['process_peak_reserved_gib']:.2f} | {verdict} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder: pipeline, data, run folders")
    ap.add_argument("--tiny", action="store_true", help="tiny pipeline on the CPU (smoke mode)")
    ap.add_argument("--bases", default=None, help="quantization of the base, comma-separated: none,int8,nf4 "
                    "(default int8; tiny: none)")
    ap.add_argument("--resolution", type=int, default=None, help="training side in px (default 1024; tiny 32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per arm (default 30; tiny 3)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=None, help="denoising steps of each sample (default 8)")
    ap.add_argument("--jsonl", type=Path, default=None, help="append every row as a JSON line here")
    args = ap.parse_args(argv)
    args.bases = (args.bases or ("none" if args.tiny else "int8")).split(",")
    args.resolution = args.resolution or (32 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 30)
    args.sample_steps = args.sample_steps or (2 if args.tiny else 8)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # flux_full_gpu, beside this file
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU: run with --tiny for the CPU smoke mode", file=sys.stderr)
            return 2
    pipe, data = build_pipeline(args.out, args.tiny), subject(args.out, args.resolution)
    rows = []
    for base in args.bases:
        run, peaks = train(args, pipe, data, base)
        rows += arm_rows(run, base, peaks)
        print(table(rows, args.resolution), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
