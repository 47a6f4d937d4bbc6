"""`kill <pid>` (SIGTERM: cron's and systemd's timeouts, an admin) undoes a run like Ctrl-C does."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
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
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        taken.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(taken):
            signal.raise_signal(signum)  # the handler it would have met: KeyboardInterrupt, sigterm_as_interrupt's, ...
