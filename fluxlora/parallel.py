"""`fluxlora train --arms-parallel [N]`: the arms of one run group trained at the same time, one worker
process per GPU (or N CPU worker processes), each worker training its share of the arms one after another.

The parent opens and locks the run folder, starts the workers (`fluxlora train ... --worker-arms a,b`, with
``CUDA_VISIBLE_DEVICES`` set to its GPU, or its share of the CPU threads), waits for them, and writes the
group status. Every arm still sees the same data order, sigmas, noise and sample seeds (they come from the
seed, not from the process), so the arms stay comparable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fluxlora import preflight
from fluxlora.rundir import GroupDir
from fluxlora.signals import Preempted


def plan(arms: list[str], slots: int) -> list[list[str]]:
    """Arms dealt round-robin over ``slots`` workers (empty workers dropped)."""
    shares = [arms[i::slots] for i in range(slots)]
    return [s for s in shares if s]


def worker_slots(requested: int | None) -> tuple[int, bool]:
    """(number of workers, on GPUs?) — one per visible GPU unless a number is given."""
    import torch

    from fluxlora.errors import RunError

    gpus = torch.cuda.device_count()
    if requested is None:
        if gpus < 2:
            raise RunError(f"--arms-parallel without a number needs at least 2 visible GPUs (found {gpus}) -> "
                           "fix: give a number of CPU worker processes (--arms-parallel 2), or drop the flag")
        return gpus, True
    if requested < 1:
        raise RunError("--arms-parallel N needs N >= 1")
    return (min(requested, gpus), True) if gpus >= 2 else (requested, False)


def worker_env(index: int, slots: int, on_gpu: bool) -> dict:
    env = dict(os.environ)
    if on_gpu:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(slots)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))
    return env


def run_parallel(cfg, config: str, overrides: list[str], resume: bool, requested: int | None,
                 warn=print) -> list[dict]:
    from fluxlora.runner import LOCK, group_status, open_group

    slots, on_gpu = worker_slots(requested)
    if resume and cfg.train.resume is None:
        cfg.train.resume = "latest"
    preflight.check(cfg)
    group = open_group(cfg, resume, warn)
    shares = plan(cfg.adapter.arms, slots)
    try:
        # Own sessions: a signal sent to the whole group (terminal Ctrl-C, SLURM, systemd) reaches the
        # workers once, through wait_all, not twice (a second one would abort the worker's checkpoint save).
        procs = [subprocess.Popen(worker_cmd(config, overrides, resume, share), env=worker_env(i, slots, on_gpu),
                                  start_new_session=True) for i, share in enumerate(shares)]
        where = "GPU" if on_gpu else "CPU process"
        for i, share in enumerate(shares):
            warn(f"{where} {i}: {', '.join(share)}")
        wait_all(procs)
        results = collect(group, cfg.adapter.arms)
        group.write_info(status=group_status(results))
        return results
    finally:
        (group.root / LOCK).unlink(missing_ok=True)


def worker_cmd(config: str, overrides: list[str], resume: bool, share: list[str]) -> list[str]:
    return [sys.executable, "-m", "fluxlora.cli", "train", config, *overrides, "--worker-arms", ",".join(share)] \
        + (["--resume"] if resume else [])


def wait_all(procs: list[subprocess.Popen]) -> None:
    """Wait for every worker; on Ctrl-C (or SIGTERM / SIGUSR1) pass the signal on (each worker saves a
    checkpoint) and wait for them to stop."""
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt as e:
        sig = e.signum if isinstance(e, Preempted) else signal.SIGINT
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in procs:
            p.wait()
        raise


def collect(group: GroupDir, arms: list[str]) -> list[dict]:
    """Each arm's summary from its status.json (written by its worker), or its error."""
    results = []
    for name in arms:
        st = group.arm(name).status()
        if st.get("status") == "done" and st.get("summary"):
            results.append(st["summary"])
        else:
            error = st.get("error") or f"worker ended with the arm {st.get('status', 'not started')}"
            results.append({"arm": name, "method": name, "error": error})
    return results

