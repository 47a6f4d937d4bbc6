"""Local processes by PID: is one still running, is it ours, stop it.

Pure /proc, signal and subprocess helpers with no libvirt or jinja behind them, so that modules which only
run a tool, wait on or stop a PID (runner.py's abandoned temporaries, judged by whether their maker still runs;
dnsmasq_control.py's dnsmasq; the lab's daemons) need not import the lab.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kvmconf.errors import KvmconfError
from kvmconf.waiting import wait_until

STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL: a daemon's clean exit (libvirtd saving state) is slow


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def in_netns(pid: int, netns: str) -> bool:
    """Whether ``pid`` lives in network namespace ``netns``: a recycled PID of an unrelated process never does."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return False


def command_line(pid: int) -> list[str]:
    """The process's argv, from /proc ([] when it is gone): what it runs, to tell a recycled PID from ours."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the process is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not alive(pid), timeout):
            return


def output_of(argv: Sequence[str], timeout: float = 120, context: str = "") -> str:
    """The standard output of a tool that must succeed; its failure, with what it said, as a KvmconfError.

    ``context`` starts the message ("lab: "), for a failure whose command alone would not say what was being done.
    """
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise KvmconfError(f"{context}`{shlex.join(argv)}` failed with exit status {result.returncode}:"
                           f" {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout
