"""The run-folder lock: of several processes starting at the same instant exactly one wins, also when
they race to take over a stale lock; a live holder is refused with its pid, a dead one is taken over."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest

from fluxlora.runner import LOCK, RunError, acquire_lock

RACERS = 4
ROUNDS = 10


def _racer(root, barrier, results, release):
    """Start together with the others, try to lock, report, and keep a won lock alive until told."""
    barrier.wait()
    try:
        acquire_lock(root, warn=lambda m: None)
        results.put(("won", os.getpid()))
    except RunError as e:
        results.put(("refused", str(e)))
    release.wait(30)


def _race(root) -> tuple[list, str]:
    ctx = mp.get_context("fork")  # the racers share this process's imports: they start in milliseconds
    barrier, results, release = ctx.Barrier(RACERS), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_racer, args=(root, barrier, results, release)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=30) for _ in procs]
        holder = (root / LOCK).read_text()  # read while the winner is still alive
    finally:
        release.set()
        for p in procs:
            p.join(30)
    return outcomes, holder


@pytest.mark.parametrize("start", ["no lock", "stale lock"])
def test_concurrent_acquisitions_exactly_one_wins(tmp_path, start):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that is gone
    for i in range(ROUNDS):
        root = tmp_path / f"r{i}"
        root.mkdir()
        if start == "stale lock":
            (root / LOCK).write_text(dead)
        outcomes, holder = _race(root)
        won = [pid for kind, pid in outcomes if kind == "won"]
        refused = [msg for kind, msg in outcomes if kind == "refused"]
        assert len(won) == 1, outcomes
        assert holder == str(won[0])
        assert all(f"pid {won[0]}" in msg for msg in refused), refused
        assert sorted(p.name for p in root.iterdir()) == [LOCK]  # no guard or temp file left behind


def test_live_holder_refused_dead_or_garbage_taken_over(tmp_path):
    lock = tmp_path / LOCK
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(sleeper.pid))
        with pytest.raises(RunError, match=f"another training \\(pid {sleeper.pid}\\).*-> fix"):
            acquire_lock(tmp_path)
        assert lock.read_text() == str(sleeper.pid)  # a refusal leaves the holder's lock alone
    finally:
        sleeper.kill()
        sleeper.wait()
    notes = []
    acquire_lock(tmp_path, warn=notes.append)
    assert lock.read_text() == str(os.getpid()) and notes == [
        f"taking over the stale lock of {tmp_path} (pid {sleeper.pid} is gone)"]
    for junk in ("not a pid", ""):  # a lock without a pid (an empty one only after a short wait)
        lock.write_text(junk)
        notes.clear()
        acquire_lock(tmp_path, warn=notes.append)
        assert lock.read_text() == str(os.getpid()) and "names no process" in notes[0]


def test_guard_left_by_a_killed_takeover_does_not_block_for_long(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / LOCK).write_text(dead)
    guard = tmp_path / (LOCK + ".takeover")
    guard.write_text(dead)  # a process killed in the middle of taking over
    t0 = time.monotonic()
    acquire_lock(tmp_path, warn=lambda m: None)
    assert (tmp_path / LOCK).read_text() == str(os.getpid()) and not guard.exists()
    assert 1.5 < time.monotonic() - t0 < 5  # waited for the guard to count as abandoned, not longer
