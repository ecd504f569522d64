"""CPU thread policy for every process fluxlora starts or runs beside.

torch runs each process with one OpenMP thread per core. Two such processes on the same cores thrash: an
OpenMP thread spins while its partners are descheduled, and small models suffer most (generating 20 toy
images took 112 s at torch's default 2 threads beside one other 2-thread job, 4 s at 1 thread). So:

- ``--threads N`` on ``train``, ``export``, ``sample`` and ``webui`` sets it explicitly;
- a training the web UI launches gets all cores but one (``for_launched_training``), and the server's own
  generation runs on 1 thread while any launched training runs, on every core otherwise
  (``for_generation``): together they never exceed the cores.
"""

from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def use(n: int | None) -> int:
    """Set torch's intra-op threads to ``n`` (None: every core); returns the count set."""
    import torch

    n = max(1, n) if n else cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def for_launched_training() -> int:
    """A training the web UI starts: every core but the one the server keeps for itself."""
    return max(1, cores() - 1)


def for_generation(training_beside: bool, configured: int | None = None) -> int:
    """The web UI's generation: ``configured`` (webui --threads) if given, else 1 thread beside a running
    training, every core when nothing else runs."""
    if configured:
        return configured
    return 1 if training_beside else cores()
