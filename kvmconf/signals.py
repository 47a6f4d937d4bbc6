"""`kill <pid>` (SIGTERM: cron's and systemd's timeouts, an admin) undoes a run like Ctrl-C does."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt, so the run's own clean-up runs before it exits.

    Python's default for SIGTERM ends the process at once, skipping every `finally`. Only the main
    thread can take signals: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Inside, a Ctrl-C or SIGTERM waits until the block has run, then reaches its usual handler.

    For a step and its journal entry, which an interrupt between them would leave done and unrecorded. Keep the
    block short: the wait is the block's length. Only the main thread can take signals: elsewhere this does nothing.
    Also when the block raises: the caller may catch its error and go on, so a held interrupt is not dropped with it;
    a KeyboardInterrupt from the handler then wins over the block's error (which stays its ``__context__``).
    """
    with interrupts_deferred():
        yield


@contextmanager
def interrupts_deferred(wake: Callable[[], None] = lambda: None) -> Iterator[Callable[[], None]]:
    """Inside, a Ctrl-C or SIGTERM reaches its usual handler only where the block calls the function it is given,
    and when the block ends (as with interrupts_held).

    For threads that hand work over queues: a KeyboardInterrupt raised between any two bytecodes of the main
    thread can land inside ``threading.Condition.notify``, after it woke a waiter and before it took that waiter
    off its list; the next notify then wakes that stale entry, the thread waiting for real is never woken, and
    joining it hangs for ever. ``wake`` runs when a signal arrives, in the main thread: it should make whatever
    the block may be blocked in return soon (shut a socket down) so the block gets to its next check.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    taken: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        taken.append(signum)
        if previous[signal.Signals(signum)] is not signal.SIG_IGN:  # an ignored signal must not cut the block short
            wake()

    def deliver() -> None:
        """Back to the usual handlers, then what was taken: KeyboardInterrupt, sigterm_as_interrupt's, ..."""
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        pending = list(dict.fromkeys(taken))
        taken.clear()
        for signum in pending:
            signal.raise_signal(signum)

    def check() -> None:
        if taken:
            deliver()
            for sig in previous:  # the handler did not raise (an ignored signal): hold again
                signal.signal(sig, hold)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # before hold can run
    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield check
    finally:
        deliver()
