"""Back up one VM: recover what an interrupted run left, then a full, incremental or offline restore point.

Running VM: one libvirt push-mode backup job for all its disks (a single point in time) into thin
qcow2 files made beforehand (REUSE_EXTERNAL), with a new checkpoint created atomically with the job.
An incremental's qcow2 files have the previous point's files as backing files, so the job writes
only the clusters dirtied since the previous checkpoint and stock `qemu-img` reads the chain. Raw
disks carry no bitmap: they are copied whole (backupmode='full') in the same job. The VM's own
disks and their backing chains are never changed: no snapshot, no overlay.

Shut-off VM: `qemu-img convert` of each image (the image lock keeps the VM from starting meanwhile);
such a point starts a new chain because no checkpoint can be created on an inactive domain.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from kvmconf.backup import journal
from kvmconf.backup.libvirt_xml import VmDisk, backup_xml, checkpoint_xml, domain_disks
from kvmconf.backup.store import (
    PARTIAL,
    DiskFile,
    Manifest,
    VmStore,
    allocated,
    fsync_path,
    sha256_file,
    write_point_files,
)
from kvmconf.errors import KvmconfError

CHECKPOINT_PREFIX = "kvmconf-"
Log = Callable[[str], None]
_POLL = 0.2


class BackupFailed(KvmconfError):
    """A backup run failed; what it had started was undone and earlier restore points are untouched."""


@dataclass(frozen=True)
class Settings:
    dir: Path
    keep: int
    full_every: int  # incrementals after a full before the next full
    nas_dir: Path | None = None
    progress: bool = False  # bytes done/total on stderr (when run on a terminal)


@dataclass
class Outcome:
    vm: str
    ok: bool
    manifest: Manifest | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _new_time(store: VmStore) -> str:
    """A point name later than every existing one (two runs in the same second wait for the next)."""
    existing = {p.name.removesuffix(PARTIAL) for p in store.dir.iterdir()} if store.dir.is_dir() else set()
    while True:
        now = utc_now()
        if now not in existing and all(now > name for name in existing if name[:1].isdigit()):
            return now
        time.sleep(0.2)


def run_tool(argv: list[str], show: bool = False) -> None:
    """Run qemu-img and the like; its own progress (-p) goes to the terminal when `show`."""
    result = subprocess.run(argv, stdout=None if show else subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            check=False)
    if result.returncode != 0:
        raise BackupFailed(f"{' '.join(argv)}: {result.stderr.strip() or 'exit status ' + str(result.returncode)}")



def explain_os_error(err: OSError, where: Path) -> str:
    if err.errno == 28:
        return f"the backup target {where} is full (no space left on device): free space or move [backup] dir"
    return f"{where}: {err.strerror or err}"


def _space_message(text: str, where: Path) -> str:
    if "No space left" in text or "ENOSPC" in text:
        return f"the backup target {where} is full (no space left on device): free space or move [backup] dir ({text})"
    return text


# --- checkpoints ---------------------------------------------------------------------------------

def our_checkpoints(dom: libvirt.virDomain) -> list[libvirt.virDomainCheckpoint]:
    return [cp for cp in dom.listAllCheckpoints() if cp.getName().startswith(CHECKPOINT_PREFIX)]


def delete_checkpoint(dom: libvirt.virDomain, name: str, disks: list[VmDisk], log: Log) -> bool:
    """Delete one of our checkpoints, also when its bitmap is broken or the domain is shut off; False if absent."""
    try:
        cp = dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return False
    try:
        cp.delete(0)
        return True
    except libvirt.libvirtError as err:
        log(f"{dom.name()}: checkpoint {name}: {err.get_error_message()}; removing its metadata only")
    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    if not dom.isActive():
        # The bitmap stays in the qcow2 images: remove it offline so it never collects dirty blocks for nobody.
        for disk in disks:
            if disk.tracked:
                subprocess.run(["qemu-img", "bitmap", "--remove", disk.path, name], capture_output=True, check=False)
    return True


# --- recovery -------------------------------------------------------------------------------------

def recover(dom: libvirt.virDomain | None, store: VmStore, log: Log) -> list[str]:
    """Undo what an interrupted run of this VM left (called with the VM's lock held). Idempotent.

    Aborts the backup job it started (a push job outlives a killed client), deletes the checkpoint it
    created (its parent then still covers every write), and removes its partial files. The VM's disks
    are never touched.
    """
    notes: list[str] = []
    entry = journal.read(store.dir)
    if entry is not None and dom is not None:
        if dom.isActive() and _job_active(dom):
            try:
                dom.abortJob()
                notes.append(f"aborted the backup job of the interrupted run {entry['time']}")
            except libvirt.libvirtError as err:
                notes.append(f"could not abort the interrupted run's job: {err.get_error_message()}")
            _wait_job_end(dom, 60.0)
        checkpoint = entry.get("checkpoint")
        if checkpoint:
            disks, _ = domain_disks(dom.XMLDesc(0))
            if delete_checkpoint(dom, checkpoint, disks, lambda _m: None):
                notes.append(f"deleted checkpoint {checkpoint} of the interrupted run")
    for partial in store.partials():
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed the partial backup {partial.name}")
    if entry is not None:
        journal.clear(store.dir)
    for note in notes:
        log(f"{store.vm}: recovery: {note}")
    return notes


def _job_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False


def _wait_job_end(dom: libvirt.virDomain, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _job_active(dom) and time.monotonic() < deadline:
        time.sleep(_POLL)


# --- the backup ----------------------------------------------------------------------------------

def _decide_incremental(dom: libvirt.virDomain, disks: list[VmDisk], points: list[Manifest], settings: Settings,
                        store: VmStore) -> tuple[Manifest | None, str]:
    """The point to build on, or None and why a full is taken."""
    if not points:
        return None, "first backup"
    last = points[-1]
    if last.checkpoint is None:
        return None, f"the last point {last.time} has no checkpoint ({last.kind})"
    if sum(1 for m in points if m.chain == last.chain) > settings.full_every:
        return None, f"the chain has reached full_every={settings.full_every} incrementals"
    if not any(cp.getName() == last.checkpoint for cp in dom.listAllCheckpoints()):
        return None, f"checkpoint {last.checkpoint} is gone from libvirt"
    before = {(d.dev, d.source, d.format) for d in last.disks}
    if before != {(d.dev, d.path, d.format) for d in disks}:
        return None, "the VM's disks changed since the last point"
    if any(not (store.point_dir(last.time) / d.file).is_file() for d in last.disks):
        return None, f"files of the last point {last.time} are missing"
    return last, ""


class _Progress:
    def __init__(self, vm: str, disks: list[VmDisk], enabled: bool) -> None:
        self.vm = vm
        self.disks = disks
        self.enabled = enabled
        self.shown = False

    def update(self, dom: libvirt.virDomain) -> None:
        if not self.enabled:
            return
        parts = []
        for disk in self.disks:
            try:
                info = dom.blockJobInfo(disk.dev, 0)
            except libvirt.libvirtError:
                info = {}
            if info and info.get("end"):
                parts.append(f"{disk.dev} {info['cur'] >> 20}/{info['end'] >> 20} MiB")
        if not parts:
            stats = dom.jobStats(0)
            if "disk_total" in stats:
                parts.append(f"all disks {stats.get('disk_processed', 0) >> 20}/{stats['disk_total'] >> 20} MiB")
        if parts:
            sys.stderr.write(f"\r{self.vm}: " + ", ".join(parts) + "   ")
            sys.stderr.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def _freeze(dom: libvirt.virDomain) -> str | None:
    """Freeze the guest's filesystems through the agent; the reason when that could not be done."""
    try:
        dom.fsFreeze()
        return None
    except libvirt.libvirtError as err:
        return err.get_error_message()


def _thaw(dom: libvirt.virDomain, log: Log) -> None:
    try:
        dom.fsThaw()
    except libvirt.libvirtError as err:
        log(f"{dom.name()}: WARNING: thawing the guest's filesystems failed: {err.get_error_message()}")


def _wait_push_job(dom: libvirt.virDomain, progress: _Progress, where: Path) -> None:
    while True:
        try:
            active = dom.isActive() and _job_active(dom)
        except libvirt.libvirtError as err:
            raise BackupFailed(f"lost the VM during the backup: {err.get_error_message()}") from None
        if not active:
            break
        progress.update(dom)
        time.sleep(_POLL)
    progress.done()
    if not dom.isActive():
        raise BackupFailed("the VM stopped (or QEMU died) during the backup; the next backup will be a new full")
    try:
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as err:
        raise BackupFailed(f"cannot read the backup job's result: {err.get_error_message()}") from None
    if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise BackupFailed(_space_message(str(stats.get("errmsg", "the backup job failed")), where))


def _make_targets(disks: list[VmDisk], partial: Path, parent: Manifest | None, dom: libvirt.virDomain,
                  sizes: dict[str, int]) -> dict[str, Path]:
    targets = {}
    for disk in disks:
        target = partial / f"{disk.dev}.qcow2"
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if parent is not None and disk.tracked:
            # Relative, so the tree still reads after it is copied (NAS) or the directory is renamed.
            argv += ["-F", "qcow2", "-b", f"../{parent.time}/{disk.dev}.qcow2"]
        argv += [str(target), str(sizes[disk.dev])]
        run_tool(argv)
        targets[disk.dev] = target
    return targets


def _running_backup(dom: libvirt.virDomain, store: VmStore, settings: Settings, log: Log) -> Manifest:
    disks, skipped = domain_disks(dom.XMLDesc(0))
    if not disks:
        raise BackupFailed("the VM has no disk to back up")
    points = store.points()
    parent, why_full = _decide_incremental(dom, disks, points, settings, store)
    notes: list[str] = []
    if parent is None:
        notes.append(f"full: {why_full}")
        for cp in our_checkpoints(dom):  # stale ones only collect dirty blocks from now on
            delete_checkpoint(dom, cp.getName(), disks, log)
    stamp = _new_time(store)
    checkpoint = CHECKPOINT_PREFIX + stamp
    partial = store.dir / (stamp + PARTIAL)
    sizes = {d.dev: dom.blockInfo(d.dev)[0] for d in disks}
    started = time.monotonic()
    journal.write(store.dir, {"time": stamp, "checkpoint": checkpoint, "pid": os.getpid(), "partial": partial.name})
    partial.mkdir(parents=True)
    targets = _make_targets(disks, partial, parent, dom, sizes)
    frozen_error = _freeze(dom)
    if frozen_error is not None:
        notes.append(f"not frozen (crash-consistent): {frozen_error}")
    try:
        try:
            dom.backupBegin(backup_xml(targets, disks, skipped, None if parent is None else parent.checkpoint),
                            checkpoint_xml(checkpoint, disks, skipped), libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        except libvirt.libvirtError as err:
            if parent is None or err.get_error_code() != libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT:
                raise BackupFailed(_space_message(err.get_error_message(), store.dir)) from None
            # A bitmap broken by a crash of QEMU: drop that checkpoint and start a new chain at once.
            notes.append(f"full: checkpoint {parent.checkpoint} is broken ({err.get_error_message()})")
            delete_checkpoint(dom, str(parent.checkpoint), disks, log)
            parent = None
            shutil.rmtree(partial)
            partial.mkdir()
            targets = _make_targets(disks, partial, None, dom, sizes)
            dom.backupBegin(backup_xml(targets, disks, skipped, None), checkpoint_xml(checkpoint, disks, skipped),
                            libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    finally:
        if frozen_error is None:
            _thaw(dom, log)
    _wait_push_job(dom, _Progress(store.vm, disks, settings.progress), store.dir)
    manifest = _finish(store, stamp, partial, disks, targets, sizes, parent, checkpoint, "incremental" if parent else
                       "full", frozen_error is None, notes, started)
    if parent is not None and parent.checkpoint:
        # One checkpoint per VM is enough (the next incremental starts at the newest): fewer bitmaps to keep up.
        delete_checkpoint(dom, parent.checkpoint, disks, log)
    return manifest


def _offline_backup(dom: libvirt.virDomain, store: VmStore, settings: Settings) -> Manifest:
    disks, _ = domain_disks(dom.XMLDesc(0))
    if not disks:
        raise BackupFailed("the VM has no disk to back up")
    stamp = _new_time(store)
    partial = store.dir / (stamp + PARTIAL)
    started = time.monotonic()
    journal.write(store.dir, {"time": stamp, "checkpoint": None, "pid": os.getpid(), "partial": partial.name})
    partial.mkdir(parents=True)
    targets, sizes = {}, {}
    for disk in disks:
        target = partial / f"{disk.dev}.qcow2"
        if settings.progress:
            sys.stderr.write(f"{store.vm}: {disk.dev} ({disk.path}):\n")
        # Zeros are not written (thin); without -U the image lock keeps the VM from starting meanwhile.
        run_tool(["qemu-img", "convert", *(["-p"] if settings.progress else []), "-f", disk.format, "-O", "qcow2",
                  disk.path, str(target)], show=settings.progress)
        targets[disk.dev] = target
        sizes[disk.dev] = dom.blockInfo(disk.dev)[0]
    return _finish(store, stamp, partial, disks, targets, sizes, None, None, "offline", False,
                   ["shut off: copied from its images (the next running backup starts a new chain)"], started)


def _finish(store: VmStore, stamp: str, partial: Path, disks: list[VmDisk], targets: dict[str, Path],
            sizes: dict[str, int], parent: Manifest | None, checkpoint: str | None, kind: str, frozen: bool,
            notes: list[str], started: float) -> Manifest:
    files = []
    copied = time.monotonic()
    for disk in disks:
        target = targets[disk.dev]
        fsync_path(target)
        backing = f"../{parent.time}/{disk.dev}.qcow2" if parent is not None and disk.tracked else None
        files.append(DiskFile(disk.dev, disk.path, disk.format, target.name, sizes[disk.dev], allocated(target),
                              sha256_file(target), backing))
    manifest = Manifest(store.vm, stamp, kind, stamp if parent is None else parent.chain,
                        None if parent is None else parent.time, checkpoint, frozen, notes, files,
                        round(time.monotonic() - started, 3),
                        {"copy_seconds": round(copied - started, 3),
                         "checksum_seconds": round(time.monotonic() - copied, 3)})
    write_point_files(partial, manifest)
    final = store.point_dir(stamp)
    partial.rename(final)  # the point exists from here on, complete
    fsync_path(store.dir)
    journal.clear(store.dir)
    return manifest


def backup_vm(dom: libvirt.virDomain, settings: Settings, keep: int, log: Log = print) -> Outcome:
    """Back up one VM under its lock, recovering an interrupted run first; never raises for a failed backup."""
    store = VmStore(settings.dir, dom.name())
    outcome = Outcome(dom.name(), ok=False)
    try:
        with journal.vm_lock(store.dir):
            outcome.notes += recover(dom, store, log)
            try:
                manifest = (_running_backup(dom, store, settings, log) if dom.isActive()
                            else _offline_backup(dom, store, settings))
            except BaseException:
                recover(dom, store, log)  # undo at once what the next run's recovery would
                raise
            outcome.manifest = manifest
            outcome.ok = True
            _remove_replaced(store, dom, log)
            store.prune(keep, log)
            if settings.nas_dir is not None:
                from kvmconf.backup.nas import stage
                stage(store, VmStore(settings.nas_dir, store.vm), keep, log)
    except KvmconfError as err:  # BackupFailed included
        outcome.error = str(err)
    except OSError as err:
        outcome.error = explain_os_error(err, store.dir)
    except libvirt.libvirtError as err:
        outcome.error = _space_message(err.get_error_message(), store.dir)
    _record(store, outcome)
    return outcome


def _remove_replaced(store: VmStore, dom: libvirt.virDomain, log: Log) -> None:
    """Disks replaced by an in-place restore are kept until the restored VM has run: it runs now."""
    entry = journal.read(store.dir, "replaced.json")
    if entry is None or not dom.isActive():
        return
    for path in entry.get("files", []):
        Path(path).unlink(missing_ok=True)
        log(f"{store.vm}: removed {path}, the disk an in-place restore replaced (the restored VM runs)")
    (store.dir / "replaced.json").unlink()


def _record(store: VmStore, outcome: Outcome) -> None:
    if not store.dir.is_dir():
        return
    entry = {"time": utc_now(), "ok": outcome.ok, "error": outcome.error,
             "point": outcome.manifest.time if outcome.manifest else None}
    with suppress(OSError):  # a full disk must not hide the backup's own error
        journal.write(store.dir, entry, journal.LAST_RUN)
