"""interrupts_held and interrupts_deferred: a Ctrl-C or SIGTERM during the block reaches its handler once the block ends
or where it checks, however it ends.

Real signals, sent to this process with os.kill, inside the block.
"""

from __future__ import annotations

import os
import signal

import pytest

from kvmconf.signals import interrupts_deferred, interrupts_held, sigterm_as_interrupt


def test_a_held_ctrl_c_arrives_after_the_block_has_run() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("step")
        steps.append("journal entry")
    assert steps == ["step", "journal entry"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_held_interrupt_is_not_dropped_when_the_block_raises(sig: signal.Signals) -> None:
    """The caller catches the block's error and goes on (a provision run notes a failed VM and does the next one):
    the interrupt must still end the run, and win over that error, which stays its context."""
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt) as interrupted, interrupts_held():
        os.kill(os.getpid(), sig)
        raise OSError("qemu-img: Could not create '/images/db.img': No space left on device")
    assert isinstance(interrupted.value.__context__, OSError)
    assert str(interrupted.value.__context__) == "qemu-img: Could not create '/images/db.img': No space left on device"


def test_the_handlers_are_restored_after_the_block() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match=r"^the block's own error$"), interrupts_held():
        raise ValueError("the block's own error")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_deferred_interrupt_is_raised_at_the_next_check_and_wakes_the_block_at_once() -> None:
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred(wake=lambda: steps.append("woken")) as check:
        check()  # nothing taken yet: goes on
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("between the checks")
        check()
        steps.append("after the check")
    assert steps == ["woken", "between the checks"]


def test_an_ignored_signal_neither_wakes_nor_stops_the_block() -> None:
    woken: list[bool] = []
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupts_deferred(wake=lambda: woken.append(True)) as check:
            os.kill(os.getpid(), signal.SIGTERM)
            check()
            os.kill(os.getpid(), signal.SIGINT)  # held again after the ignored one: still deferred
            with pytest.raises(KeyboardInterrupt):
                check()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert woken == [True]  # the Ctrl-C's wake only
