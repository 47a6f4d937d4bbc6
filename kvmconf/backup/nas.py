"""The NAS stage: copy finished restore points to the external directory, verify them there, prune there.

It runs after the local backup succeeded, never inside the backup job (a slow NFS mount would slow the
guest's writes through copy-before-write). A copy counts only after its checksums match on the NAS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from generators.files import fsync_path
from kvmconf.backup import verify
from kvmconf.backup.store import (
    PARTIAL,
    DiskFile,
    Manifest,
    VmStore,
    checksum_file,
    dependents,
    write_point_files,
)
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
    if local_root.exists() and nas_device == local_root.stat().st_dev:  # missing: a lost disk, restored from the NAS
        raise NasFailed(f"nas_dir {nas_root} is on the same filesystem as the [backup] dir {local_root}: the NAS"
                        " share is not mounted there (a copy would not be on the NAS)")
    if nas_device == Path("/").stat().st_dev:  # the [backup] dir on a disk of its own, the share not mounted
        raise NasFailed(f"nas_dir {nas_root} is on the root filesystem: the NAS share is not mounted there (a copy"
                        " would fill / and not be on the NAS)")


def stage(local: VmStore, nas: VmStore, keep: int, log: Log) -> list[str]:
    """Copy every local point missing on the NAS (oldest first, so bases come before their incrementals).

    A point that does not verify (damaged here, or its copy on the NAS) is not copied, nor the points built on
    it; the other chains are, and NasFailed then names each such point.
    """
    check_mounted(local.root, nas.root)
    try:
        return _stage(local, nas, keep, log)
    except OSError as err:  # a read-only or full NAS: its error, not the local backup directory's
        raise NasFailed(f"{local.vm}: the NAS copy in nas_dir {nas.root} failed:"
                        f" {err.filename + ': ' if err.filename else ''}{err.strerror or err}") from None


def _stage(local: VmStore, nas: VmStore, keep: int, log: Log) -> list[str]:
    nas.dir.mkdir(exist_ok=True)
    for partial in nas.partials():
        shutil.rmtree(partial)
    there = {m.time for m in nas.points()}
    points = local.points()
    # A copy backup-verify found damaged is copied again, or it stays so until retention, with every later point
    # of its chain built on it on the NAS (backup-status counts it as a copy). It is replaced only by a verified one.
    redo = set(verify.damaged_points(nas)) & {m.time for m in points}
    copied: list[str] = []
    problems: list[str] = []
    blocked: set[str] = set()  # points built on one that did not copy: their base is not on the NAS
    for manifest in points:
        if (manifest.time in there and manifest.time not in redo) or manifest.time in blocked:
            continue
        problem = _copy_point(local, nas, manifest)
        if problem:  # the other chains still go to the NAS
            later = dependents(points, manifest.time)
            blocked.update(later)
            problems.append(problem + (f" (nor the points built on it: {', '.join(later)})" if later else ""))
            continue
        copied.append(manifest.time)
        log(f"{local.vm}: NAS: copied and verified {manifest.time}"
            + (" (replacing the copy backup-verify found damaged)" if manifest.time in redo else ""))
    verify.forget(nas, copied)
    nas.prune(keep, log, "NAS retention")
    if problems:
        raise NasFailed("; ".join(problems))
    return copied


def _copy_point(local: VmStore, nas: VmStore, manifest: Manifest) -> str:
    """Copy one point to the NAS, verified there before its manifest makes it a point; what went wrong, or ""."""
    partial = nas.dir / (manifest.time + PARTIAL)
    partial.mkdir()
    for disk in manifest.disks:
        failure = _copy_file(local.point_dir(manifest.time) / disk.file, partial / disk.file)
        if failure:  # a full NAS, most likely: the next points would fail alike
            shutil.rmtree(partial, ignore_errors=True)  # the partial copy; the error below is what matters
            raise NasFailed(f"{local.vm}: copying {manifest.time} to the NAS failed: {failure}")
    # On the NAS's disk and verified before the manifest makes it a point (the NAS prunes its older
    # chains next): a crash in between leaves only a partial copy.
    for disk in manifest.disks:
        _flush_and_uncache(partial / disk.file)
    mismatched = [d for d in manifest.disks if checksum_file(partial / d.file, d.algorithm) != d.checksum]
    if mismatched:
        shutil.rmtree(partial)
        return _mismatch(local, manifest, mismatched)
    write_point_files(partial, manifest)
    point = nas.point_dir(manifest.time)
    damaged = nas.dir / (manifest.time + ".damaged" + PARTIAL)  # a partial: what a crash leaves, the next stage removes
    if point.exists():  # a copy backup-verify found damaged, out of the way now that its replacement verified
        point.rename(damaged)
    partial.rename(point)
    fsync_path(nas.dir)
    if damaged.exists():
        shutil.rmtree(damaged)
    return ""


def _copy_file(source: Path, target: Path) -> str:
    """Copy one file, thin; cp's error, or "" (a function of its own: the tests inject a NAS that damages copies)."""
    result = subprocess.run(["cp", "--sparse=always", str(source), str(target)], capture_output=True, text=True,
                            check=False)
    return (result.stderr.strip() or f"cp exited {result.returncode}") if result.returncode != 0 else ""


def _flush_and_uncache(path: Path) -> None:
    """Flush a copy to the NAS, then drop it from this host's page cache: the read-back must come from the NAS.

    (The pages are clean after the fsync, so the kernel drops them; an NFS client then reads from the server.)
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _mismatch(local: VmStore, manifest: Manifest, mismatched: list[DiskFile]) -> str:
    """Whose fault a copy that does not verify is: the local file's (damaged since it was written) or the NAS's."""
    damaged = [d.file for d in mismatched
               if checksum_file(local.point_dir(manifest.time) / d.file, d.algorithm) != d.checksum]
    if damaged:
        return (f"{local.vm}: restore point {manifest.time} is damaged here (checksum mismatch: {', '.join(damaged)}"
                f" in {local.point_dir(manifest.time)}): not copied to the NAS")
    return (f"{local.vm}: the NAS copy of {manifest.time} does not verify (checksum mismatch:"
            f" {', '.join(d.file for d in mismatched)}; the local files do)")
