"""Stopping a training cleanly on a signal: Ctrl-C (SIGINT), and the signals schedulers send before they kill
a job: SIGTERM (docker stop, systemd, Kubernetes, cloud spot preemption, SLURM at the time limit) and SIGUSR1
(SLURM's ``--signal=USR1@<seconds>`` warning). Each raises in the main thread like the first Ctrl-C: the
current step finishes or rolls back, the completed steps are checkpointed, the arm is marked interrupted and
``--resume`` continues exactly. A stop by SIGTERM / SIGUSR1 exits with 128 + the signal number (143 / 138);
a Ctrl-C with 130."""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM or SIGUSR1). A KeyboardInterrupt, so every
    place that saves work on Ctrl-C saves it on these too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _raise_preempted(signum, frame):
    raise Preempted(signum)


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 raise Preempted in the main thread (no-op elsewhere: handlers are per process and
    only the main thread may set them)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:  # a parent that made us ignore it meant it
                signal.signal(sig, _raise_preempted)


def _exception_for(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Preempted(signum)


@contextlib.contextmanager
def deferred():
    """A stop signal arriving inside the block is raised when the block ends, so an optimizer update is
    never saved under the previous step's number (resume would apply it twice). Signals the process ignores
    stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        current = signal.getsignal(sig)
        if current not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if pending:
            raise _exception_for(pending[0])


def child_default_sigint() -> None:
    """``preexec_fn`` for a child we stop with SIGINT: a shell starting a job in the background (and so
    its children) ignores SIGINT, and a Python child that starts with SIGINT ignored never turns Ctrl-C
    into KeyboardInterrupt. Restoring the default makes the child's Python install its Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
