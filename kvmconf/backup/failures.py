"""What a failed backup run says: BackupFailed, and the OS and libvirt errors it meets, said about its places."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from kvmconf.errors import KvmconfError


class BackupFailed(KvmconfError):
    """A backup run failed; what it had started was undone and earlier restore points are untouched."""


def explain_os_error(err: OSError, target: Path) -> str:
    """`err` said about the file it names, a full disk about that file's directory (the backup target `target`
    when it names none: a write to an open file, as stream.copy's, carries no name)."""
    named = None if err.filename is None else Path(os.fsdecode(err.filename))
    if err.errno == errno.ENOSPC:
        where = target if named is None else named.parent
        return (f"the backup target {where} is full (no space left on device): free space or move [backup] dir"
                if where.is_relative_to(target) else f"{where} is full (no space left on device): free space there")
    return f"{named or target}: {err.strerror or err}"


def explain_libvirt_error(text: str, scratch_dir: Path) -> str:
    """libvirt's errors: in pull mode libvirt and QEMU never write the backup target (this process does), so a
    full filesystem libvirt hits holds the job's scratch files or the VM's own disks."""
    if "No space left" in text or "ENOSPC" in text:
        return (f"no space left for the backup job's scratch files (under {scratch_dir}, [backup] scratch_dir) or"
                f" on the VM's own storage: free space there ({text})")
    return text
