"""The NAS stage: copy finished restore points to the external directory, verify them there, prune there.

It runs after the local backup succeeded, never inside the backup job (a slow NFS mount would slow the
guest's writes through copy-before-write). A copy counts only after its checksums match on the NAS.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from generators.files import fsync_path
from kvmconf.backup.store import PARTIAL, VmStore, checksum_file, write_point_files
from kvmconf.errors import KvmconfError

Log = Callable[[str], None]


class NasFailed(KvmconfError):
    """Copying to the NAS or verifying the copy failed; the local backup is still good."""


def check_mounted(local_root: Path, nas_root: Path) -> None:
    """Refuse a nas_dir that is missing, or on the [backup] dir's filesystem: the NFS share is not mounted there.

    Copying anyway would fill the mount point's filesystem (usually /) and count copies that are not on the NAS.
    """
    try:
        nas_device = nas_root.stat().st_dev
    except FileNotFoundError:
        raise NasFailed(f"nas_dir {nas_root} does not exist: is the NAS share mounted? (kvmconf creates only the VM"
                        " directories below it)") from None
    except OSError as err:
        raise NasFailed(f"nas_dir {nas_root}: {err.strerror}") from None
    if nas_device == local_root.stat().st_dev:
        raise NasFailed(f"nas_dir {nas_root} is on the same filesystem as the [backup] dir {local_root}: the NAS"
                        " share is not mounted there (a copy would not be on the NAS)")
    if nas_device == Path("/").stat().st_dev:  # the [backup] dir on a disk of its own, the share not mounted
        raise NasFailed(f"nas_dir {nas_root} is on the root filesystem: the NAS share is not mounted there (a copy"
                        " would fill / and not be on the NAS)")


def stage(local: VmStore, nas: VmStore, keep: int, log: Log) -> list[str]:
    """Copy every local point missing on the NAS (oldest first, so bases come before their incrementals)."""
    check_mounted(local.root, nas.root)
    try:
        return _stage(local, nas, keep, log)
    except OSError as err:  # a read-only or full NAS: its error, not the local backup directory's
        raise NasFailed(f"{local.vm}: the NAS copy in nas_dir {nas.root} failed:"
                        f" {err.filename + ': ' if err.filename else ''}{err.strerror or err}") from None


def _stage(local: VmStore, nas: VmStore, keep: int, log: Log) -> list[str]:
    nas.dir.mkdir(exist_ok=True)
    for partial in nas.partials():
        shutil.rmtree(partial, ignore_errors=True)
    there = {m.time for m in nas.points()}
    copied = []
    for manifest in local.points():
        if manifest.time in there:
            continue
        partial = nas.dir / (manifest.time + PARTIAL)
        partial.mkdir()
        for disk in manifest.disks:
            source = local.point_dir(manifest.time) / disk.file
            result = subprocess.run(["cp", "--sparse=always", str(source), str(partial / disk.file)],
                                    capture_output=True, text=True, check=False)
            if result.returncode != 0:
                shutil.rmtree(partial, ignore_errors=True)
                raise NasFailed(f"{local.vm}: copying {manifest.time} to the NAS failed: {result.stderr.strip()}")
        # On the NAS's disk and verified before the manifest makes it a point (the NAS prunes its older
        # chains next): a crash in between leaves only a partial copy.
        for disk in manifest.disks:
            fsync_path(partial / disk.file)
        problems = [d.file for d in manifest.disks if checksum_file(partial / d.file, d.algorithm) != d.checksum]
        if problems:
            shutil.rmtree(partial, ignore_errors=True)
            raise NasFailed(f"{local.vm}: the NAS copy of {manifest.time} does not verify (checksum mismatch:"
                            f" {', '.join(problems)})")
        write_point_files(partial, manifest)
        partial.rename(nas.point_dir(manifest.time))
        fsync_path(nas.dir)
        copied.append(manifest.time)
        log(f"{local.vm}: NAS: copied and verified {manifest.time}")
    nas.prune(keep, log, "NAS retention")
    return copied
