"""signals.py: stop signals arriving inside an optimizer update are raised after it; ignored ones stay
ignored; SIGTERM / SIGUSR1 become Preempted (a KeyboardInterrupt with its own exit code)."""

from __future__ import annotations

import os
import signal

import pytest

from fluxlora import signals


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, *signals.STOP_SIGNALS)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_inside_the_block_is_raised_after_it(handlers, sig):
    signals.install_stop_handlers()
    done = []
    with pytest.raises(signals.Preempted) as e:
        with signals.deferred():
            os.kill(os.getpid(), sig)
            done.append("the rest of the update ran")
    assert done and e.value.signum == sig and e.value.exit_code == 128 + sig
    assert isinstance(e.value, KeyboardInterrupt)  # every Ctrl-C path saves work on it too
    assert signal.getsignal(sig) is signals._raise_preempted  # the handler is back after the block


def test_ctrl_c_inside_the_block_is_a_keyboard_interrupt_after_it(handlers):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as e:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
    assert not isinstance(e.value, signals.Preempted)


def test_an_ignored_signal_stays_ignored(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)  # a background job's SIGINT: nothing happens
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
