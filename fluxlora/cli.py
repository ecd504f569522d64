"""Command line: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from fluxlora.errors import USER_ERRORS
from fluxlora.formats import FORMATS
from fluxlora.signals import Preempted, install_stop_handlers

EPILOG = """examples:
  fluxlora train train_configs/toy_subject.yaml
  fluxlora train my_subject.yaml train.steps=500 adapter.init=[lora,pissa,loram]
  fluxlora train my_subject.yaml --resume
  fluxlora train my_subject.yaml --dry-run --dump-dataset /tmp/seen
  fluxlora export runs/toy_subject
  fluxlora sweep sweeps/toy_study.yaml          # a grid of runs + runs/toy_study/report.md
  fluxlora sweep sweeps/toy_study_all.yaml      # a study: several sweeps on one grid, one report
  fluxlora sample runs/toy_subject --prompt "a zxq emblem on a red background, center" --seed 3
  fluxlora info runs/toy_subject/loram/adapter.safetensors
  fluxlora webui --runs runs
  fluxlora toy pretrain --out toy_base
"""


THREADS = dict(type=int, default=None, metavar="N", help="torch CPU threads (default: every core; set it when "
               "other CPU-heavy processes share the machine, so the total stays within the cores)")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train one or several adapter arms from a YAML config")
    t.add_argument("config", help="YAML config (see train_configs/)")
    t.add_argument("overrides", nargs="*", help="config overrides key.path=value, e.g. train.steps=100")
    t.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoints")
    t.add_argument("--arms-parallel", nargs="?", type=int, const=0, default=None, metavar="N",
                   help="train the arms at the same time: one worker per visible GPU (2+ GPUs), or N "
                        "worker processes (N CPU processes when there is no second GPU)")
    t.add_argument("--worker-arms", default=None, help=argparse.SUPPRESS)  # set by --arms-parallel
    t.add_argument("--dry-run", action="store_true", help="run every check that needs no model and list the "
                   "images and captions it would train on; loads no weights, exit 0 only if a run would start")
    t.add_argument("--dump-dataset", default=None, metavar="DIR", help="with --dry-run (implies it): write each "
                   "training image as the trainer sees it (resized, cropped, flipped) as PNG + caption into DIR")
    t.add_argument("--threads", **THREADS)


def _sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="train a grid of runs (e.g. init x lr x rank x seed) and write a report")
    w.add_argument("sweep", help="sweep YAML (see sweeps/): a run config, fixed overrides and a grid; or a "
                   "study YAML whose parts: are sweeps on one grid, reported as one comparison (docs/sweeps.md)")
    w.add_argument("--dry-run", action="store_true", help="check every cell's config and list the cells and "
                   "what is on disk for each; trains nothing")
    w.add_argument("--report", action="store_true", help="only rewrite report.md and plots/ from what is on disk")
    w.add_argument("--threads", **THREADS)


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="re-export the adapters of a run from its latest checkpoints")
    e.add_argument("run_dir", help="runs/<name>")
    e.add_argument("--arm", action="append", help="only this arm (repeatable; default all)")
    e.add_argument("--format", action="append", metavar="|".join(FORMATS),
                   help="file format (repeatable or comma list; default: the config's export.formats)")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="tensor dtype of the files (default: the config's export.dtype)")
    e.add_argument("--rank", type=int, default=None, metavar="R", help="truncate every layer's delta to "
                   "rank R (truncated SVD) for a smaller file *-rR.safetensors; prints the error it introduces")
    e.add_argument("--step", type=int, default=None, metavar="N", help="export the checkpoint of step N (into "
                   "<arm>/exports/step-N/) instead of the latest; the error lists the steps that have one")
    e.add_argument("--threads", **THREADS)


def _sample_and_info_parsers(sub) -> None:
    s = sub.add_parser("sample", help="generate images with a trained adapter through diffusers")
    s.add_argument("run_dir", help="runs/<name>")
    s.add_argument("--prompt", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    s.add_argument("--arm", default=None, help="which arm (default: the first)")
    s.add_argument("--threads", **THREADS)
    s.add_argument("--out", default=None, help="output PNG (default: <arm>/sample-<seed>.png)")
    i = sub.add_parser("info", help="print the metadata of an exported adapter file")
    i.add_argument("file", help="adapter.safetensors")


def _webui_parser(sub) -> None:
    w = sub.add_parser("webui", help="browse and compare runs side by side in the browser (Gradio)")
    w.add_argument("--runs", default="runs", help="runs folder to browse and launch into (default: runs)")
    w.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    w.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    w.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    w.add_argument("--threads", type=int, default=None, metavar="N", help="threads of the server's own generation "
                   "(default: 1 while a training it launched runs, else every core); launched trainings get "
                   "every core but one")


def _toy_parser(sub) -> None:
    toy = sub.add_parser("toy", help="the embedded toy base model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    pt = toy_sub.add_parser("pretrain", help="pretrain the toy FLUX base model (resumable)")
    pt.add_argument("--out", required=True, help="pipeline directory to write")
    pt.add_argument("--work", default=None, help="work/resume folder (default: <out>.work)")
    pt.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pt.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    pt.add_argument("--snapshot", action="store_true",
                    help="do not train: assemble --out from the work folder's latest checkpoint (EMA weights)")
    for flag, kind, what in (("--vae-steps", int, "VAE steps"), ("--transformer-steps", int, "transformer steps"),
                             ("--batch", int, "transformer batch size"), ("--pool", int, "cached world images"),
                             ("--seed", int, "seed of everything"), ("--lr", float, "transformer peak lr"),
                             ("--t5-lr", float, "T5 encoder peak lr (independent of --lr)"),
                             ("--object-weight", float, "extra loss weight of the named object's cell")):
        pt.add_argument(flag, type=kind, default=None, help=f"{what} (default: the shipped model's recipe)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxlora", description="DreamBooth-style LoRA training (FLUX.1, SD3, SDXL, SD 1.5) with "
                                "the adapter initialization (LoRA, PiSSA, LoRAM, ...) as a comparable axis.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _sweep_parser, _export_parser, _sample_and_info_parsers, _webui_parser, _toy_parser):
        add(sub)
    return p


def quiet_libraries() -> None:
    """Silence import-time chatter of optional backends (they are not used)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return dispatch(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM / SIGUSR1 during training (signals.py)
        print(f"stopped by {e.name}: a checkpoint was saved; continue with --resume", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.command == "toy":
            print("interrupted: run the same command again to resume from the last save", file=sys.stderr)
        else:
            print("interrupted: a checkpoint was saved; continue with --resume", file=sys.stderr)
        return 130


def dispatch(args) -> int:
    from fluxlora import commands, threads

    if args.command in ("train", "export", "sample", "sweep") and args.threads:
        threads.use(args.threads)
    if args.command == "train":
        install_stop_handlers()
        return commands.train(args.config, args.overrides, args.resume, args.arms_parallel, args.worker_arms,
                              args.dry_run, args.dump_dataset)
    if args.command == "sweep":
        install_stop_handlers()
        return commands.sweep(args.sweep, args.dry_run, args.report)
    if args.command == "export":
        return commands.export(Path(args.run_dir), args.arm, commands.parse_formats(args.format), args.dtype,
                               args.rank, args.step)
    if args.command == "sample":
        return commands.sample(Path(args.run_dir), args.prompt, args.seed, args.steps, args.arm, args.out)
    if args.command == "info":
        return commands.info(Path(args.file))
    if args.command == "webui":
        from webui.app import serve

        return serve(Path(args.runs), args.host, args.port, args.auth, threads=args.threads)
    if args.command == "toy":
        from fluxlora.toy.pretrain import pretrain, snapshot

        out = Path(args.out)
        work = Path(args.work) if args.work else out.with_name(out.name + ".work")
        keys = ("vae_steps", "transformer_steps", "batch", "pool", "seed", "lr", "t5_lr", "object_weight")
        recipe = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        if args.snapshot:
            if recipe:
                print(f"error: --snapshot trains nothing; drop {', '.join(recipe)}", file=sys.stderr)
                return 2
            print(f"{out}: transformer step {snapshot(out, work)}")
            return 0
        pretrain(out, work, threads=args.threads, device=args.device, **recipe)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
