"""Waiting for something outside this process (a job to end, a VM to stop, a process to exit), with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(done: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Whether `done()` became true within `timeout` seconds, asked every `every` seconds (and once at the start)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
