"""Back up one VM: recover what an interrupted run left, then a full, incremental or offline restore point.

Running VM: one libvirt pull-mode backup job for all its disks (a single point in time), with a new
checkpoint created atomically with the job. QEMU exports each disk over NBD on a unix socket; this
process reads the export and writes each disk's thin qcow2 file itself, front to back, hashing as
it writes (stream.py), because that is as fast as the disk reads: a push job, or qemu-img plus a
separate checksum pass, read the data twice or the whole virtual size. A full stores what holds
data; an incremental stores the blocks dirtied since the previous checkpoint, in a qcow2 whose
backing file is the previous point's, so stock `qemu-img` reads the chain. Raw disks carry no bitmap:
they are copied whole (backupmode='full') in the same job. The VM's own disks and their backing
chains are never changed: no snapshot, no overlay. The only write kvmconf makes to a VM's images is the
removal of its own checkpoint's bitmap from a shut-off VM's qcow2 files (delete_checkpoint).

Shut-off VM: `qemu-img convert` of each image (the image lock keeps the VM from starting meanwhile);
such a point starts a new chain because no checkpoint can be created on an inactive domain.

Beside this module: recovery.py undoes what an interrupted run left, before each run; pull_job.py begins and
ends a running VM's job; checkpoints.py keeps kvmconf's checkpoints; stream.py copies an export into its file;
store.py lays the points out on disk; failures.py says what went wrong.
"""

from __future__ import annotations

import datetime as dt
import json
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

from generators.files import fsync_path
from kvmconf.backup import durability, journal, qcow2, stream, verify
from kvmconf.backup.checkpoints import CHECKPOINT_PREFIX, our_checkpoints, retire_checkpoints
from kvmconf.backup.failures import BackupFailed, explain_libvirt_error, explain_os_error
from kvmconf.backup.libvirt_xml import VmDisk, dirty_context, domain_disks, left_out
from kvmconf.backup.nbd import NbdClient, NbdError
from kvmconf.backup.pull_job import SCRATCH_DIR, JobDir, begin, check_scratch_space, end, refuse_another_job
from kvmconf.backup.recovery import FROZEN, recover
from kvmconf.backup.store import (
    PARTIAL,
    POINT_NAME,
    DiskFile,
    Manifest,
    VmStore,
    allocated,
    checksum_file,
    expired_chains,
    parse_time,
    utc_now,
    write_point_files,
)
from kvmconf.errors import KvmconfError
from kvmconf.signals import sigterm_as_interrupt
from kvmconf.waiting import wait_until

Log = Callable[[str], None]
_NOTICE_STOPPED = 5.0  # seconds libvirt may take to see that QEMU died, after its NBD export closed
_VM_STOPPED = "the VM stopped (or QEMU died) during the backup; the next backup will be a new full"
# How far the newest restore point may be ahead of this host's clock before a run refuses: two runs in the
# same second wait for the next one, but a point from a clock that was wrong (a boot before NTP) would make
# that wait last until the clock catches up, every later run failing on the lock meanwhile.
CLOCK_SKEW = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Settings:
    """What every VM's backup shares ([backup] of site.toml); `keep` is per VM, an argument of backup_vm."""

    dir: Path
    full_every: int  # incrementals after a full before the next full
    nas_dir: Path | None = None
    progress: bool = False  # bytes done/total on stderr (when run on a terminal)
    scratch_dir: Path = SCRATCH_DIR


@dataclass
class Outcome:
    vm: str
    ok: bool
    manifest: Manifest | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)
    # With ok: which step after the point was made failed ("NAS copy", "retention", ...), said before its error.
    failed_step: str = ""


def _new_time(store: VmStore) -> str:
    """A point name later than every existing one (two runs in the same second wait for the next).

    Refuses, naming the point, when the newest one is more than CLOCK_SKEW ahead of this host's clock. Only
    names of points (and partial ones) count: a directory renamed out of the way (<time>.damaged, as a manifest
    that does not parse is told to be) is no point, and one dated ahead made the wait last until the clock
    passed it, the VM's lock held all along.
    """
    names = (p.name.removesuffix(PARTIAL) for p in store.dir.iterdir()) if store.dir.is_dir() else iter(())
    newest = max((name for name in names if _is_time(name)), default=None)
    if newest is not None:
        ahead = parse_time(newest) - dt.datetime.now(dt.UTC)
        if ahead > CLOCK_SKEW:
            raise BackupFailed(f"the restore point {store.dir / newest} is dated {ahead.total_seconds():.0f} s"
                               f" ahead of this host's clock ({utc_now()}): a new point must sort after it. Check"
                               " the clock (NTP); if it is right, move that point out of the directory or remove"
                               " it")
    while True:
        now = utc_now()
        if newest is None or now > newest:
            return now
        time.sleep(0.2)


def _is_time(name: str) -> bool:
    """Whether `name` is a point's time, as a new point's name must sort after."""
    if POINT_NAME.fullmatch(name) is None:
        return False
    try:
        parse_time(name)
    except ValueError:  # 20261399T..., a name no run made
        return False
    return True


def run_tool(argv: list[str], show: bool = False, error: type[KvmconfError] = BackupFailed,
             on_stderr: bool = False) -> None:
    """Run qemu-img and the like; its own progress (-p, written to its stdout) goes to the terminal when `show`:
    to stderr with `on_stderr` (a backup's, where a running VM's goes: not into a log stdout is redirected to);
    fails as `error`."""
    shown = sys.stderr if on_stderr else None
    result = subprocess.run(argv, stdout=shown if show else subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            check=False)
    if result.returncode != 0:
        raise error(f"{' '.join(argv)}: {result.stderr.strip() or 'exit status ' + str(result.returncode)}")


def backing_file(parent: Manifest | None, disk: VmDisk) -> str | None:
    """What an incremental's file of `disk` names as its backing file: the parent point's file of the same disk.

    Relative, so the tree still reads after it is copied (NAS) or the directory is renamed. Untracked
    (raw) disks are copied whole every time: no backing file.
    """
    return f"../{parent.time}/{disk.dev}.qcow2" if parent is not None and disk.tracked else None


def _decide_incremental(checkpoints: list[str], disks: list[VmDisk], points: list[Manifest], settings: Settings,
                        store: VmStore) -> tuple[Manifest | None, str]:
    """The point to build on, or None and why a full is taken."""
    if not points:
        return None, "first backup"
    last = points[-1]
    if last.checkpoint is None:
        return None, f"the last point {last.time} has no checkpoint ({last.kind})"
    if sum(1 for m in points if m.chain == last.chain) > settings.full_every:
        return None, f"the chain has reached full_every={settings.full_every} incrementals"
    if last.checkpoint not in checkpoints:
        return None, f"checkpoint {last.checkpoint} is gone from libvirt"
    before = {(d.dev, d.source, d.format) for d in last.disks}
    if before != {(d.dev, d.path, d.format) for d in disks}:
        return None, "the VM's disks changed since the last point"
    broken = store.chain_intact(last)  # a point deleted or moved by hand: the chain cannot be read
    if broken is not None:
        return None, f"the last point's chain cannot be restored ({broken})"
    damaged = verify.damaged_in_chain(store, last)
    if damaged:
        return None, f"backup-verify found damaged points in the last point's chain ({', '.join(damaged)})"
    return last, ""


_REDRAW = 0.2  # seconds between two redraws of a disk's progress line


class _Progress:
    """Bytes done/total per disk, one terminal line per disk, redrawn a few times a second."""

    def __init__(self, vm: str, enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.vm = vm
        self.enabled = enabled
        self.clock = clock
        self.open_line = False
        self.last = -_REDRAW

    def disk(self, dev: str, total: int) -> Callable[[int], None]:
        def update(done: int) -> None:
            now = self.clock()
            if not self.enabled or (now - self.last < _REDRAW and done < total):
                return
            self.last = now
            sys.stderr.write(f"\r{self.vm}: {dev} {done >> 20}/{total >> 20} MiB" + ("\n" if done >= total else "   "))
            sys.stderr.flush()
            self.open_line = done < total
        return update

    def done(self) -> None:
        """End a line left open (a disk that failed midway)."""
        if self.open_line:
            sys.stderr.write("\n")
            self.open_line = False


def _plan_disks(job: JobDir, disks: list[VmDisk], parent: Manifest | None,
                ) -> list[tuple[VmDisk, NbdClient, qcow2.Layout]]:
    """Connect to each disk's export and lay its file out; the caller closes the clients."""
    plans = []
    clients: list[NbdClient] = []
    try:
        for disk in disks:
            backing = backing_file(parent, disk)  # an incremental of this disk has one
            context = dirty_context(disk) if backing else None
            client = NbdClient.connect(str(job.socket), disk.dev,
                                       ["base:allocation"] + ([context] if context else []))
            clients.append(client)
            plans.append((disk, client, stream.plan(client, context, backing)))
    except BaseException:
        for client in clients:
            client.close()
        raise
    return plans


def _check_space(where: Path, needed: int) -> None:
    """Refuse before writing anything when the files cannot fit (they are sized exactly in advance)."""
    free = shutil.disk_usage(where).free
    if needed > free:
        raise BackupFailed(f"the backup target {where} is too small for this backup: it needs {needed >> 20} MiB,"
                           f" {free >> 20} MiB are free: free space or move [backup] dir")


def _running_backup(dom: libvirt.virDomain, store: VmStore, settings: Settings, log: Log) -> Manifest:
    xml = dom.XMLDesc(0)
    disks, skipped = domain_disks(xml)
    if not disks:
        raise BackupFailed("the VM has no disk to back up")
    refuse_another_job(dom)
    points = store.points()
    checkpoints = [cp.getName() for cp in our_checkpoints(dom)]
    parent, why_full = _decide_incremental(checkpoints, disks, points, settings, store)
    notes: list[str] = []
    if parent is None:
        notes.append(f"full: {why_full}")
    notes += left_out(xml)
    retire_checkpoints(dom, checkpoints, parent, disks, log)
    stamp = _new_time(store)
    checkpoint = CHECKPOINT_PREFIX + stamp
    partial = store.dir / (stamp + PARTIAL)
    started = time.monotonic()
    job = JobDir.plan(dom, xml, disks, stamp, settings.scratch_dir)
    check_scratch_space(job, disks)
    entry = {"time": stamp, "checkpoint": checkpoint, "pid": os.getpid(), "partial": partial.name,
             "job_dir": str(job.dir)}
    journal.write(store.dir, entry)
    partial.mkdir()
    job.make()

    def may_freeze() -> None:
        # Not flushed: the journal must outlive this process (SIGKILL), not the host (a guest does not stay frozen
        # across a power cut). Left set after the thaw, as recovery's thaw of a guest not frozen does nothing.
        journal.write(store.dir, {**entry, FROZEN: True}, durable=False)
    checksums: dict[str, str] = {}
    progress = _Progress(store.vm, settings.progress)
    try:
        parent, frozen = begin(dom, xml, job, disks, skipped, parent, checkpoint, notes, log, may_freeze)
        plans = _plan_disks(job, disks, parent)
        try:
            _check_space(store.dir, sum(layout.file_size for _, _, layout in plans))
            for disk, client, layout in plans:
                checksums[disk.dev] = stream.copy(client, layout, partial / f"{disk.dev}.qcow2",
                                                  progress.disk(disk.dev, layout.data_size))
        finally:
            progress.done()
            for _, client, _ in plans:
                client.close()
    except NbdError as err:
        if wait_until(lambda: not dom.isActive(), _NOTICE_STOPPED):  # a dead QEMU's socket closes first
            raise BackupFailed(_VM_STOPPED) from None
        raise BackupFailed(str(err)) from None
    finally:
        end(dom, job)
        shutil.rmtree(job.dir, ignore_errors=True)
    if not dom.isActive():
        raise BackupFailed(_VM_STOPPED)
    return _finish(store, stamp, partial, disks, checksums, job.sizes, parent, checkpoint,
                   "incremental" if parent else "full", frozen, notes, started)


def _offline_backup(dom: libvirt.virDomain, store: VmStore, settings: Settings) -> Manifest:
    xml = dom.XMLDesc(0)
    disks, _ = domain_disks(xml)
    if not disks:
        raise BackupFailed("the VM has no disk to back up")
    stamp = _new_time(store)
    partial = store.dir / (stamp + PARTIAL)
    started = time.monotonic()
    _check_space(store.dir, sum(_converted_size(disk) for disk in disks))
    journal.write(store.dir, {"time": stamp, "checkpoint": None, "pid": os.getpid(), "partial": partial.name})
    partial.mkdir(parents=True)
    checksums, sizes = {}, {}
    for disk in disks:
        target = partial / f"{disk.dev}.qcow2"
        if settings.progress:
            sys.stderr.write(f"{store.vm}: {disk.dev} ({disk.path}):\n")
        # Zeros are not written (thin); without -U the image lock keeps the VM from starting meanwhile.
        run_tool(["qemu-img", "convert", *(["-p"] if settings.progress else []), "-f", disk.format, "-O", "qcow2",
                  disk.path, str(target)], show=settings.progress, on_stderr=True)
        checksums[disk.dev] = checksum_file(target)
        sizes[disk.dev] = dom.blockInfo(disk.dev)[0]
    return _finish(store, stamp, partial, disks, checksums, sizes, None, None, "offline", False,
                   ["shut off: copied from its images (the next running backup starts a new chain)",
                    *left_out(xml)], started)


def _converted_size(disk: VmDisk) -> int:
    """The size of the qcow2 file `qemu-img convert` makes of a shut-off VM's disk (its data and metadata, as
    `qemu-img measure` counts them: at most a little more than convert writes, which also skips zeros it reads)."""
    result = subprocess.run(["qemu-img", "measure", "--output=json", "-O", "qcow2", "-f", disk.format, disk.path],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackupFailed(f"qemu-img measure {disk.path}: {result.stderr.strip() or result.returncode}")
    return int(json.loads(result.stdout)["required"])


def _finish(store: VmStore, stamp: str, partial: Path, disks: list[VmDisk], checksums: dict[str, str],
            sizes: dict[str, int], parent: Manifest | None, checkpoint: str | None, kind: str, frozen: bool,
            notes: list[str], started: float) -> Manifest:
    """Write the manifest (the files are complete, not yet flushed: see durability.py) and turn the partial
    directory into the point."""
    files = []
    for disk in disks:
        target = partial / f"{disk.dev}.qcow2"
        files.append(DiskFile(disk.dev, disk.path, disk.format, target.name, sizes[disk.dev], allocated(target),
                              checksums[disk.dev], backing_file(parent, disk)))
    manifest = Manifest(store.vm, stamp, kind, stamp if parent is None else parent.chain,
                        None if parent is None else parent.time, checkpoint, frozen, notes, files,
                        round(time.monotonic() - started, 3), boot_id=durability.boot_id())
    write_point_files(partial, manifest)
    final = store.point_dir(stamp)
    partial.rename(final)  # the point exists from here on, complete
    fsync_path(store.dir)
    journal.clear(store.dir)
    return manifest


def backup_vm(dom: libvirt.virDomain, settings: Settings, keep: int, log: Log = print) -> Outcome:
    """Back up one VM under its lock, recovering an interrupted run first; never raises for a failed backup.

    Ctrl-C or SIGTERM undoes the run at once (job, checkpoint, partial files) and then propagates.
    """
    store = VmStore(settings.dir, dom.name())
    outcome = Outcome(dom.name(), ok=False)
    try:
        with sigterm_as_interrupt(), journal.vm_lock(store.dir):
            outcome.notes += recover(dom, store, log, settings.scratch_dir)
            outcome.notes += durability.settle(store, log, flush=False)  # after a reboot: verify, drop lost points
            try:
                manifest = (_running_backup(dom, store, settings, log) if dom.isActive()
                            else _offline_backup(dom, store, settings))
            except BaseException:
                # Undo at once what the next run's recovery would. Whatever stops the undo (a refusal of its own
                # as another tool's job runs, libvirtd gone) must not replace what ended the run, an interrupt
                # above all: the next VM of --all would start.
                try:
                    recover(dom, store, log, settings.scratch_dir)
                except Exception as undo_failed:  # said; the next run recovers
                    outcome.notes.append(f"the run could not be undone at once ({undo_failed}): the next"
                                         " run recovers what it left")
                    log(f"{store.vm}: {outcome.notes[-1]}")
                raise
            outcome.manifest = manifest
            outcome.ok = True
            _after_the_point(dom, store, settings, keep, outcome, log)
    except (KvmconfError, OSError, libvirt.libvirtError) as err:  # BackupFailed included
        outcome.error = _explain(err, store, settings)
    _record(store, outcome)
    return outcome


def _after_the_point(dom: libvirt.virDomain, store: VmStore, settings: Settings, keep: int, outcome: Outcome,
                     log: Log) -> None:
    """What follows a point made: each step is tried whatever failed before it (a failed retention must not keep
    the point off the NAS); the first failure is the outcome's error, named by its step, and the run exits 1."""
    def retention() -> None:
        if expired_chains(store.points(), keep):
            outcome.notes.extend(durability.settle(store, log))  # the points that stay must be on disk first
        store.prune(keep, log)

    def nas_copy() -> None:
        if settings.nas_dir is not None:
            from kvmconf.backup.nas import stage
            stage(store, VmStore(settings.nas_dir, store.vm), keep, log)

    steps: list[tuple[str, Callable[[], None]]] = [
        ("removing the disks an in-place restore replaced", lambda: _remove_replaced(store, dom, log)),
        ("retention", retention), ("NAS copy", nas_copy)]
    for step, action in steps:
        try:
            action()
        except (KvmconfError, OSError, libvirt.libvirtError) as err:
            if outcome.error:  # said now: the outcome's line names only the first
                outcome.notes.append(f"{step} failed too: {_explain(err, store, settings)}")
                log(f"{store.vm}: {outcome.notes[-1]}")
            else:
                outcome.failed_step, outcome.error = step, _explain(err, store, settings)


def _explain(err: KvmconfError | OSError | libvirt.libvirtError, store: VmStore, settings: Settings) -> str:
    if isinstance(err, OSError):
        return explain_os_error(err, store.dir)
    if isinstance(err, libvirt.libvirtError):
        return explain_libvirt_error(err.get_error_message(), settings.scratch_dir)
    return str(err)


def _remove_replaced(store: VmStore, dom: libvirt.virDomain, log: Log) -> None:
    """Disks replaced by an in-place restore are kept until the restored VM has run: it runs now."""
    entry = journal.read(store.dir, journal.REPLACED)
    if entry is None or not dom.isActive():
        return
    if journal.SWAPPING in entry:  # the VM may run on restored and old disks mixed: the kept ones stay
        log(f"{store.vm}: an in-place restore did not finish swapping the disks: the replaced ones are kept"
            f" ({', '.join(entry.get('files', []))}); shut the VM off and restore again, which puts them back first")
        return
    for path in entry.get("files", []):
        Path(path).unlink(missing_ok=True)
        log(f"{store.vm}: removed {path}, the disk an in-place restore replaced (the restored VM runs)")
    (store.dir / journal.REPLACED).unlink()


def _record(store: VmStore, outcome: Outcome) -> None:
    if not store.dir.is_dir():
        return
    entry = {"time": utc_now(), "ok": outcome.ok, "error": outcome.error,
             "point": outcome.manifest.time if outcome.manifest else None}
    with suppress(OSError):  # a full disk must not hide the backup's own error
        journal.write(store.dir, entry, journal.LAST_RUN, durable=False)  # for backup-status: not worth a flush
