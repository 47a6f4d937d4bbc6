"""Per-VM lock and the journal of what a run has started, so the next run can undo an interrupted one."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from generators.files import replace_text
from kvmconf.errors import KvmconfError

LOCK = ".lock"
JOURNAL = "journal.json"
LAST_RUN = "last-run.json"
REPLACED = "replaced.json"  # disks an in-place restore replaced, kept until the restored VM runs
SWAPPING = "swapping"  # in REPLACED while an in-place restore swaps the disks: [[disk, restored image, kept], ...]


@contextmanager
def vm_lock(vm_dir: Path) -> Iterator[None]:
    """flock on <vm dir>/.lock: the kernel drops it when the holder dies, so a killed run never blocks the next.

    Only <vm dir> is made: a missing [backup] dir is a backup disk not mounted (or a host not set up), and
    creating it would fill the root filesystem with backups the admin does not know are there.
    """
    try:
        vm_dir.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise KvmconfError(f"{vm_dir.name}: the [backup] dir {vm_dir.parent} does not exist (is its filesystem"
                           " mounted?): `fab kvm-setup` creates it") from None
    fd = os.open(vm_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KvmconfError(f"{vm_dir.name}: another backup or restore of this VM is running"
                               f" (it holds {vm_dir / LOCK})") from None
        yield
    finally:
        os.close(fd)


class Unreadable(KvmconfError, ValueError):
    """A journal file that does not parse. Each is replaced whole by a rename, so only damage does this: a power
    cut right after a rename that was not flushed leaves an empty file on some filesystems."""


def read(vm_dir: Path, name: str = JOURNAL) -> dict[str, Any] | None:
    path = vm_dir / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # JSON's errors and undecodable bytes alike
        raise Unreadable(f"{path} does not parse ({err})") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{path} does not hold a JSON object")
    return data


def write(vm_dir: Path, entry: dict[str, Any], name: str = JOURNAL, durable: bool = True) -> None:
    """Replace `name` whole; `durable`: on disk on return (the journal: recovery after a power cut reads it)."""
    replace_text(vm_dir / name, json.dumps(entry, indent=2, sort_keys=True) + "\n", flush=durable)


def clear(vm_dir: Path) -> None:
    (vm_dir / JOURNAL).unlink(missing_ok=True)
