"""One `fluxlora train` invocation: the run group, the shared preparation, the arms, the summary."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from fluxlora import block_swap, checkpoint, initpass, methods, preflight, validation
from fluxlora.arms import check_arm, storage_bytes, train_arm
from fluxlora.config import arm_config, config_hash, dump_config
from fluxlora.distributed import make_accelerator, on_main
from fluxlora.errors import USER_ERRORS, AdapterError, CheckpointError, RunError, TrainingStopped
from fluxlora.formats import loader_warnings
from fluxlora.prepare import prepare
from fluxlora.rundir import GroupDir, pid_alive
from fluxlora.signals import Preempted


LOCK = ".lock"
GUARD_STALE_S = 2.0


def _holder(lock: Path) -> int | None:
    """The pid in the lock file; 0 when it holds no pid (stale); None when there is no lock file.
    An empty file may be a lock being created this instant: wait a moment for its pid."""
    for _ in range(20):
        try:
            text = lock.read_text().strip()
        except FileNotFoundError:
            return None
        if text:
            return int(text) if text.isdigit() else 0
        time.sleep(0.05)
    return 0


def _create(path: Path, pid: int) -> bool:
    """Create ``path`` holding ``pid`` only if no such file exists (O_EXCL: of two racers one wins)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(pid))
    return True


def _take_over(lock: Path, stale: int) -> bool:
    """Replace a stale lock by ours, guarded by a second O_EXCL file so that of two processes taking over
    the same stale lock only one does; False: someone else got there first (look again)."""
    guard = lock.with_name(LOCK + ".takeover")
    if not _create(guard, os.getpid()):
        with contextlib.suppress(OSError):  # held for milliseconds: an older one was left by a killed process
            if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                guard.unlink()
        return False
    try:
        if _holder(lock) != stale:  # changed (or released) since we looked: decide again
            return False
        tmp = lock.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, lock)
        return True
    finally:
        guard.unlink(missing_ok=True)


def lock_holder(root: Path) -> int | None:
    """The pid of the live process that holds the run folder's lock; None when none does."""
    pid = _holder(Path(root) / LOCK)
    return pid if pid and pid_alive(pid) else None


def acquire_lock(root: Path, warn=print) -> Path:
    """One training per run folder: a lock file with our pid, created atomically; a lock whose process is
    gone is stale and taken over."""
    lock, me = root / LOCK, os.getpid()
    for _ in range(100):
        if _create(lock, me):
            return lock
        pid = _holder(lock)
        if pid == me:
            return lock
        if pid is None:  # released meanwhile: try again
            continue
        if pid and pid_alive(pid):
            raise RunError(f"another training (pid {pid}) is writing to {root} -> fix: wait for it, stop it, "
                           f"or use another name=")
        if _take_over(lock, pid):
            warn(f"taking over the stale lock of {root} "
                 + (f"(pid {pid} is gone)" if pid else "(it names no process)"))
            return lock
        time.sleep(0.05)  # 100 tries: longer than GUARD_STALE_S
    raise RunError(f"could not lock {root}: its lock file keeps changing -> fix: make sure no other training "
                   f"uses this folder, then delete {lock}")


def open_group(cfg, resume: bool, warn=print) -> GroupDir:
    group = GroupDir(Path(cfg.output_dir) / cfg.name)
    if group.group_file.exists() and not resume:
        raise RunError(f"{group.root} already holds a run -> fix: pass --resume to continue it, or choose "
                       f"another name (name=... on the command line)")
    group.root.mkdir(parents=True, exist_ok=True)
    acquire_lock(group.root, warn)
    group.config_file.write_text(dump_config(cfg), encoding="utf-8")
    arms = cfg.adapter.arms
    group.write_info(name=cfg.name, arms=arms, config_hash=config_hash(cfg),
                     created=group.info().get("created", time.time()), status="running")
    for name in arms:
        arm = group.arm(name).create()
        if not arm.status():
            arm.set_status("queued", step=0, total=cfg.train.steps, method=name)
    return group


def run(cfg, resume: bool = False, warn=print, arms: list[str] | None = None, owner: bool = True) -> list[dict]:
    """Train every arm of the config (or only ``arms``), one after another; a failed arm does not stop
    the others. ``owner=False``: the run folder was opened (and is locked) by a parent process that
    trains other arms of the same group in parallel (--arms-parallel); it writes the group status."""
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RunError("train.tensorboard is on but the tensorboard package is missing -> fix: "
                           "pip install tensorboard, or set train.tensorboard=false") from None
    if resume and cfg.train.resume is None:
        cfg.train.resume = "latest"
    preflight.check(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    main = accelerator.is_main_process
    warn = warn if main else (lambda message: None)
    if cfg.train.batch_size % accelerator.num_processes:
        raise RunError(f"train.batch_size {cfg.train.batch_size} is the global batch and must divide evenly "
                       f"over {accelerator.num_processes} processes -> fix: use a multiple of it")
    if not owner:
        try:
            return _run_arms(cfg, GroupDir(Path(cfg.output_dir) / cfg.name), resume, warn, accelerator, arms, False)
        except RefusedBeforeTraining as refused:
            raise refused.error from None
    fresh = not (Path(cfg.output_dir) / cfg.name / "group.json").exists()
    group = on_main(accelerator, lambda: open_group(cfg, resume, warn), RunError) or \
        GroupDir(Path(cfg.output_dir) / cfg.name)
    try:
        return _run_arms(cfg, group, resume, warn, accelerator, arms)
    except RefusedBeforeTraining as refused:
        if main and fresh:
            discard_new_group(group)
        raise refused.error from None
    finally:
        if main:
            (group.root / LOCK).unlink(missing_ok=True)


class RefusedBeforeTraining(Exception):
    """A user error raised after the run folder was opened but before any arm trained (wraps it)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def discard_new_group(group: GroupDir) -> None:
    """Remove what this invocation wrote into a run folder it created, when the run was refused before any
    arm trained: nothing half-written stays behind. Generated class images are a cache and are kept."""
    for arm in group.arms():
        if arm.status().get("status") == "queued":  # written by open_group; a summary is never deleted
            arm.status_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            arm.root.rmdir()
    for path in (group.config_file, group.group_file):
        path.unlink(missing_ok=True)
    (group.root / LOCK).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        group.root.rmdir()


def check_free_space(folder: Path, need: int) -> None:
    """Refuse a run whose checkpoints and exports (arms.storage_bytes) cannot fit on the output disk."""
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if need > free:
        raise RunError(f"the arms' checkpoints and exports need about {_size(need)} but {folder} has "
                       f"{_size(free)} free -> fix: free disk space, lower train.keep_checkpoints, or choose "
                       "another output_dir")


def _bytes_in(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def _prepared_and_checked(cfg, group: GroupDir, warn, accelerator, arms: list[str]):
    """The shared preparation and every arm's model-dependent checks (targets, formats, init_from fit);
    a user error here is RefusedBeforeTraining."""
    try:
        prep = prepare(cfg, accelerator.device, warn=warn, main_first=accelerator.main_process_first,
                       evaluate=accelerator.is_main_process)
        prep.autocast = accelerator.autocast
        prep.process_index, prep.num_processes = accelerator.process_index, accelerator.num_processes
        if prep.validation is not None and prep.main:
            with block_swap.resident(prep.model, cfg.train.blocks_to_swap, prep.device, cfg.source):
                validation.reference(prep)  # the base model's scores, before any arm's adapter
        need, said, pending = 0, set(), []
        for method in arms:  # a file or target problem stops the run before any arm trains
            acfg, arm = arm_config(cfg, method), group.arm(method)
            targets, _ = check_arm(prep, acfg, method)
            for line in loader_warnings(acfg.export.formats, targets, acfg.model.family, acfg.adapter.dora):
                if line not in said:  # the same targets in every arm: say it once
                    said.add(line)
                    warn(f"warning: {line}")
            if arm.status().get("status") != "done":  # on --resume, what is on disk already counts
                need += max(0, storage_bytes(prep, acfg, method, targets) - _bytes_in(arm.root))
            if _starts_from_data(acfg, method, arm):
                pending.append(initpass.request(acfg, method, targets))
        check_free_space(Path(cfg.output_dir), need)
        prep.init_cache.pending = pending
    except USER_ERRORS as e:
        raise RefusedBeforeTraining(e) from e
    return prep


def _run_arms(cfg, group: GroupDir, resume: bool, warn, accelerator, arms=None, owner=True) -> list[dict]:
    arms = arms or cfg.adapter.arms
    prep = _prepared_and_checked(cfg, group, warn, accelerator, arms)
    results = []
    for method in arms:
        arm = group.arm(method)
        if arm.status().get("status") == "done" and resume:
            results.append(arm.status().get("summary", {"arm": method}))
            continue
        try:
            summary = train_arm(prep, arm_config(cfg, method), method, arm)
        except (TrainingStopped, AdapterError, CheckpointError, OSError) as e:
            message = str(e) if not isinstance(e, OSError) else (
                f"could not write {e.filename or 'a file'}: {e.strerror or e} -> free disk space (or fix the "
                "permissions) and resume with --resume; the last checkpoint is kept")
            _mark_failed(arm, message, prep.main, warn)
            warn(f"arm {method} failed: {message}")
            results.append({"arm": method, "method": method, "error": message})
            continue
        except KeyboardInterrupt as e:
            if prep.main:
                why = f"stopped by {e.name}" if isinstance(e, Preempted) else "interrupted by the user"
                arm.set_status("interrupted", error=f"{why}; resume with --resume")
                group.write_info(status="interrupted")
            raise
        if prep.main:
            arm.set_status("done", summary=summary)
        results.append(summary)
    if prep.main and owner:
        group.write_info(status=group_status(results))
    return results


def _starts_from_data(acfg, method: str, arm) -> bool:
    """Whether the arm will compute a data-driven init (not from a checkpoint or adapter.init_from): the run's
    first arm of a pass kind computes all of them in one pass (initpass.Shared)."""
    return (methods.get(method).needs != methods.WEIGHTS and not acfg.adapter.init_from
            and checkpoint.find(arm, acfg.train.resume) is None)


def _mark_failed(arm, message: str, main: bool, warn) -> None:
    """status.json says failed with the reason; on a full disk even that may not be writable: say so."""
    if not main:
        return
    try:
        arm.set_status("failed", error=message)
    except OSError as e:
        warn(f"could not record the failure in {arm.status_file}: {e}")


def group_status(results: list[dict]) -> str:
    failed = [r for r in results if "error" in r]
    return "failed" if failed and len(failed) == len(results) else "done"


def summary_table(results: list[dict]) -> str:
    """The final comparison table printed by `fluxlora train`."""
    head = (f"{'arm':<14}{'lr':>9}{'clipped':>8}{'init s':>9}{'params':>12}{'final loss':>12}{'val subj':>10}"
            f"{'val prior':>11}{'subject':>9}{'prior px':>10}{'peak MB':>9}{'wall s':>9}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['arm']:<14}{'':>105}  failed: {r['error'][:110]}")
            continue
        m, v = r.get("final_metrics") or {}, r.get("final_validation") or {}
        lines.append(f"{r['arm']:<14}{_num(r.get('lr'), '.1e'):>9}{_num(r.get('clip_fraction'), '.0%'):>8}"
                     f"{r['init_seconds']:>9.3f}{r['trainable_params']:>12,}{_num(r.get('final_loss'), '.5f'):>12}"
                     f"{_num(v.get('val_loss_subject'), '.5f'):>10}{_num(v.get('val_loss_prior'), '.2e'):>11}"
                     f"{_num(m.get('subject_fidelity'), '.3f'):>9}{_num(m.get('prior_drift_px'), '.2f'):>10}"
                     f"{r.get('peak_memory_mb', 0):>9.0f}{r['wall_seconds']:>9.1f}  done")
    lines.append("val subj: held-out subject loss (lower is better); val prior: change on prior prompts "
                 "(lower: less forgetting); subject: toy fidelity (higher is better); prior px: toy drift")
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
