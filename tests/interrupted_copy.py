"""A child process for test_backup_stream: `stream.copy` when a SIGTERM arrives at a chosen moment.

    python -m tests.interrupted_copy inside-notify SOCKET TARGET
    python -m tests.interrupted_copy stalled-read SOCKET TARGET SERVER_PID

A child, so that a copy that hangs for ever fails its test (the parent's timeout) instead of hanging pytest;
SIGUSR1 prints where each thread is (faulthandler). It prints one line per fact the test checks.

inside-notify: the signal arrives while the main thread is inside `threading.Condition.notify`, waking the
hash thread to hand it a buffer, the moment of the hang seen in CI. A KeyboardInterrupt raised there leaves
the woken waiter on the condition's list; once the hash thread waits again, the next notify wakes that stale
waiter instead, so that thread never sees the pipeline's end and joining it hangs. A trace function sends the
signal just before the waiter is released and holds the main thread until the hash thread waits again: without
that the hang needs the two threads to meet in a window of microseconds.

stalled-read: the signal arrives while the main thread waits for an answer the NBD server will not give
(SIGSTOP once the copy is planned; the test sends SIGCONT); the copy must end at once, not when the
connection's timeout runs out.
"""

from __future__ import annotations

import faulthandler
import linecache
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kvmconf.backup import stream
from kvmconf.backup.nbd import NbdClient
from kvmconf.signals import sigterm_as_interrupt

_NOTIFY = threading.Condition.notify.__code__
_RELEASE = "waiter.release()"
_WAIT = threading.Condition.wait.__code__


class _SignalInsideNotify:
    """sys.settrace's function for the main thread: SIGTERM just after the first waiter release of a notify."""

    def __init__(self) -> None:
        self.sent = False
        self.woken: Any = None  # the waiter released (the hash thread's lock)

    def __call__(self, frame: FrameType, event: str, _arg: Any) -> Any:
        return self.in_notify if frame.f_code is _NOTIFY and not self.sent else None

    def in_notify(self, frame: FrameType, event: str, _arg: Any) -> Any:
        if self.woken is None:
            if event == "line" and linecache.getline(_NOTIFY.co_filename, frame.f_lineno).strip() == _RELEASE:
                self.woken = frame.f_locals["waiter"]
                # Pending, not handled, until the release is done: Python would run the handler in this function.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            return self.in_notify
        # The next line: the waiter is released and still on the list. The handler runs here, as the signal
        # is let in, and a KeyboardInterrupt it raises goes on in notify.
        self.sent = True
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return None

    def hash_thread_waits_again(self) -> bool:
        """The woken hash thread took its buffer and waits for the next one, with a waiter of its own."""
        for thread in threading.enumerate():
            frame = sys._current_frames().get(thread.ident or 0)
            if thread.name == "backup-hash" and frame is not None and frame.f_code is _WAIT:
                return frame.f_locals.get("waiter") not in (None, self.woken)
        return False


def _hold_the_end_marker(tracer: _SignalInsideNotify) -> None:
    """The pipeline's end (None) is queued once the hash thread waits again: the order that lost its wake-up."""
    put = queue.Queue.put

    def held_put(self: queue.Queue[Any], item: Any, *args: Any, **kwargs: Any) -> None:
        if item is None and tracer.sent:
            deadline = time.monotonic() + 10
            while not tracer.hash_thread_waits_again() and time.monotonic() < deadline:
                time.sleep(0.001)
        put(self, item, *args, **kwargs)

    queue.Queue.put = held_put  # type: ignore[method-assign]


def main(mode: str, socket_path: str, target: str, server_pid: str = "") -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    tracer = _SignalInsideNotify()
    with NbdClient.connect(socket_path, "vda", timeout=60.0) as client, sigterm_as_interrupt():
        layout = stream.plan(client, None, None)
        if mode == "inside-notify":
            _hold_the_end_marker(tracer)
            sys.settrace(tracer)
        else:
            os.kill(int(server_pid), signal.SIGSTOP)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        try:
            stream.copy(client, layout, Path(target))
            print("copied")
        except KeyboardInterrupt:
            print("interrupted")
        finally:
            sys.settrace(None)
        if mode == "inside-notify":
            print("signal sent inside notify" if tracer.sent else "signal never sent: notify has no line"
                  f" {_RELEASE!r} on this Python")
        else:
            print(f"ended {time.monotonic() - started - 0.5:.1f} s after the signal")
    left = [t.name for t in threading.enumerate() if t.name in ("backup-hash", "backup-write")]
    print(f"pipeline threads still running: {left}" if left else "pipeline threads ended")


if __name__ == "__main__":
    main(*sys.argv[1:])
