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
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from generators.files import fsync_path
from kvmconf import jobs
from kvmconf.backup import durability, journal, qcow2, stream, verify
from kvmconf.backup.libvirt_xml import (
    VmDisk,
    backup_socket,
    backup_xml,
    checkpoint_xml,
    dirty_context,
    domain_disks,
    has_guest_agent,
    left_out,
    qemu_owner,
)
from kvmconf.backup.nbd import NbdClient, NbdError
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

CHECKPOINT_PREFIX = "kvmconf-"
SCRATCH_DIR = Path("/var/tmp")  # [backup] scratch_dir's default: the job's socket and scratch files, see _Job
Log = Callable[[str], None]
_POLL = 0.05
JOB_DIR_PREFIX = "kvmconf-backup-"  # + PID and time: a run's NBD socket and scratch files, in [backup] scratch_dir
JOB_OWNER = "vm"  # in a job dir: the VM whose run made it, so that a run whose journal was lost is still cleaned up
_NOTICE_STOPPED = 5.0  # seconds libvirt may take to see that QEMU died, after its NBD export closed
_VM_STOPPED = "the VM stopped (or QEMU died) during the backup; the next backup will be a new full"
FROZEN = "frozen"  # in the journal once the guest may be frozen: recovery thaws it
# How far the newest restore point may be ahead of this host's clock before a run refuses: two runs in the
# same second wait for the next one, but a point from a clock that was wrong (a boot before NTP) would make
# that wait last until the clock catches up, every later run failing on the lock meanwhile.
CLOCK_SKEW = dt.timedelta(minutes=1)


class BackupFailed(KvmconfError):
    """A backup run failed; what it had started was undone and earlier restore points are untouched."""


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
        # Only this bitmap, named after our checkpoint: the images' data and other bitmaps are not touched.
        for disk in disks:
            if disk.tracked:
                removed = subprocess.run(["qemu-img", "bitmap", "--remove", disk.path, name], capture_output=True,
                                         text=True, check=False)
                if removed.returncode != 0:  # it keeps recording writes, harmlessly: said, not fatal
                    log(f"{dom.name()}: could not remove bitmap {name} from {disk.path}:"
                        f" {removed.stderr.strip() or 'exit status ' + str(removed.returncode)}")
    return True


# --- recovery -------------------------------------------------------------------------------------

def recover(dom: libvirt.virDomain | None, store: VmStore, log: Log, scratch_dir: Path | None = None) -> list[str]:
    """Undo what an interrupted run of this VM left (called with the VM's lock held). Idempotent.

    Thaws the guest's filesystems if the run may have frozen them, aborts the backup job it started
    (a pull job lasts until aborted, also after its client died), deletes the checkpoint it created
    (its parent then still covers every write), and removes its partial files and its job directory,
    also one that no journal names any more: any job dir of this VM in `scratch_dir` is a dead run's.
    The VM's disks are not written (delete_checkpoint says the one exception, on a shut-off VM).
    A job on the VM that is not the run's (another tool's backup, a migration) is left alone, and so is
    what the run left: recovery fails. Only the thaw comes first, whatever runs: a guest left frozen
    blocks every write of its filesystems. A run stopped once its point was in place has nothing to undo.
    """
    notes: list[str] = []
    try:
        entry = journal.read(store.dir)
    except journal.Unreadable as err:
        # Damaged (see journal.Unreadable): what the run started is unknown, so whatever it may have left is undone.
        # Its checkpoint, not named, is deleted with the other unused ones by the next backup (_retire_checkpoints);
        # its job dir is found from its job while that runs, else by the VM's name in it (_dead_job_dirs).
        notes.append(f"{err}: undoing what the interrupted run it described may have left")
        entry = {"time": "(its journal does not parse)",
                 FROZEN: dom is not None and bool(dom.isActive()) and has_guest_agent(dom.XMLDesc(0))}
    if entry is not None and store.is_point(str(entry.get("time"))):
        # Stopped after its point was moved into place (the job ended, its dir removed) and before the journal
        # was cleared: undoing it would delete the checkpoint that point's next incremental starts from.
        notes.append(f"the interrupted run {entry['time']} had finished its point: nothing to undo")
        entry = None
        journal.clear(store.dir)
    if entry is not None and dom is not None:
        if entry.get(FROZEN) and dom.isActive():
            notes.append(_thaw_left_frozen(dom))
        if dom.isActive() and _job_active_when_settled(dom):
            _refuse_unless_ours(dom, entry)
            if not entry.get("job_dir"):  # a lost journal: the job's socket says where its dir and scratch files are
                entry["job_dir"] = str(_job_dir(dom))
            try:
                dom.abortJob()
                notes.append(f"aborted the backup job of the interrupted run {entry['time']}")
            except libvirt.libvirtError as err:
                notes.append(f"could not abort the interrupted run's job: {err.get_error_message()}")
            jobs.wait_until_ended(dom, 60.0)
        checkpoint = entry.get("checkpoint")
        if checkpoint:
            disks, _ = domain_disks(dom.XMLDesc(0))
            if delete_checkpoint(dom, checkpoint, disks, lambda _m: None):
                notes.append(f"deleted checkpoint {checkpoint} of the interrupted run")
    if entry is not None and entry.get("job_dir"):
        shutil.rmtree(entry["job_dir"], ignore_errors=True)  # the NBD socket and scratch files
    # As many bytes as the guest overwrote during its job. A job still running (its journal deleted, not lost: no
    # recovery aborts it) keeps its dir, as the refusal of the next backup says it runs.
    running = _job_dir(dom) if dom is not None and dom.isActive() else None
    for job_dir in _dead_job_dirs(scratch_dir, store.vm):
        if job_dir == running:
            continue
        shutil.rmtree(job_dir, ignore_errors=True)
        notes.append(f"removed {job_dir}, the job dir of a run whose journal was lost")
    for partial in store.partials():
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed the partial backup {partial.name}")
    if entry is not None:
        journal.clear(store.dir)
    for note in notes:
        log(f"{store.vm}: recovery: {note}")
    return notes


def _dead_job_dirs(scratch_dir: Path | None, vm: str) -> list[Path]:
    """The job dirs in `scratch_dir` that a run of `vm` made: with the VM's lock held, no run of it is alive."""
    if scratch_dir is None:
        return []
    found = []
    for job_dir in scratch_dir.glob(JOB_DIR_PREFIX + "*"):
        with suppress(OSError):  # another VM's run may be removing its own right now
            if (job_dir / JOB_OWNER).read_text() == vm:
                found.append(job_dir)
    return found


def _thaw_left_frozen(dom: libvirt.virDomain) -> str:
    """fsThaw of filesystems that may be frozen; a guest that is not frozen (or has no agent) makes it a no-op."""
    try:
        dom.fsThaw()
        return "thawed the guest's filesystems the interrupted run may have left frozen"
    except libvirt.libvirtError as err:
        return f"could not thaw the guest's filesystems the interrupted run may have left frozen: " \
            f"{err.get_error_message()}"


def _refuse_unless_ours(dom: libvirt.virDomain, entry: dict[str, Any]) -> None:
    """The active job is the interrupted run's only when it is a backup job exporting on the socket in its job dir;
    when the journal was lost, in a job dir of ours (the VM's lock held, no other run of ours can be running)."""
    job_dir = entry.get("job_dir")
    if job_dir and _runs_our_job(dom, Path(job_dir)):
        return
    if "job_dir" not in entry and _runs_our_job(dom, None):
        return
    raise BackupFailed(f"another job runs on the VM ({jobs.describe(dom)}), not the backup job of the interrupted"
                       f" run {entry.get('time')}: it and what that run left are left alone; run the backup again"
                       " when it has ended")


def _runs_our_job(dom: libvirt.virDomain, job_dir: Path | None) -> bool:
    """Whether the VM's job is the backup job of the run whose job dir this is (its NBD socket is in it); with
    None, of any run of ours (its socket is in a job dir named as ours are)."""
    found = _job_dir(dom)
    if found is None:
        return False
    return found == job_dir if job_dir else found.name.startswith(JOB_DIR_PREFIX)


def _job_dir(dom: libvirt.virDomain) -> Path | None:
    """The directory of the VM's pull-mode backup job's NBD socket; None without such a job."""
    try:
        socket = backup_socket(dom.backupGetXMLDesc(0))
    except libvirt.libvirtError:  # no backup job: a migration, a block job of another tool, ...
        return None
    return None if socket is None else Path(socket).parent


def _refuse_another_job(dom: libvirt.virDomain) -> None:
    """libvirt runs one job per VM: a backup begun beside another would wait 30 s for it, then fail saying only
    that it could not acquire a lock."""
    if jobs.active(dom):
        raise BackupFailed(f"another job runs on the VM ({jobs.describe(dom)}): it is left alone; run the backup"
                           " again when it has ended")


def _job_active_when_settled(dom: libvirt.virDomain, timeout: float = 60.0) -> bool:
    """Whether a job runs, once libvirt can say so.

    A client killed during backupBegin leaves libvirt finishing the begin on its own for a moment,
    answering "backup job data missing" meanwhile. Deleting the checkpoint in that moment crashed
    libvirtd 9.0 here, so recovery waits for a clear answer.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
        except libvirt.libvirtError as err:
            if time.monotonic() > deadline:
                raise BackupFailed(f"libvirt cannot say whether the interrupted run's backup job still runs:"
                                   f" {err.get_error_message()}") from None
        time.sleep(_POLL)


# --- the backup ----------------------------------------------------------------------------------

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


def _freeze(dom: libvirt.virDomain, xml: str, may_freeze: Callable[[], None]) -> str | None:
    """Freeze the guest's filesystems through the agent; the reason when that could not be done."""
    if not has_guest_agent(xml):  # libvirt would refuse too, after a round trip (up to 11 ms on a busy host)
        return "the VM has no guest agent channel (org.qemu.guest_agent.0)"
    may_freeze()
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


@dataclass(frozen=True)
class _Job:
    """Where a pull job's NBD socket and scratch files go: private to QEMU (it creates the socket) and root.

    Short (a unix socket path has at most 107 bytes) and outside /run (QEMU may have a /run of its
    own). The name is known before it exists, so the journal can name it first.
    """

    dir: Path
    sizes: dict[str, int]  # dev -> virtual size
    owner: tuple[int, int] | None  # QEMU's uid and gid
    vm: str  # written into the dir (JOB_OWNER): a VM name can be too long for the socket's path

    @classmethod
    def plan(cls, dom: libvirt.virDomain, xml: str, disks: list[VmDisk], stamp: str, scratch_dir: Path) -> _Job:
        return cls(scratch_dir / f"{JOB_DIR_PREFIX}{os.getpid()}-{stamp}",
                   {d.dev: _virtual_size(dom, d) for d in disks}, qemu_owner(xml), dom.name())

    @property
    def socket(self) -> Path:
        return self.dir / "nbd.sock"

    def make(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # a reused PID's leftover
        self.dir.mkdir(mode=0o700)
        (self.dir / JOB_OWNER).write_text(self.vm)
        self._chown(self.dir)

    def make_scratch(self) -> None:
        """An empty qcow2 scratch file per disk, made here in microseconds (REUSE_EXTERNAL): libvirt would
        create each with a QEMU job of its own, a noticeable part of a small incremental's time."""
        for dev, size in self.sizes.items():
            scratch = self.dir / f"{dev}.scratch"
            scratch.unlink(missing_ok=True)
            scratch.write_bytes(qcow2.plan(size, []).metadata)
            self._chown(scratch)

    def _chown(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, *self.owner)


def _virtual_size(dom: libvirt.virDomain, disk: VmDisk) -> int:
    """QEMU's size of a disk (a scratch file must match it): a qcow2's from its header, read in microseconds;
    others from libvirt's blockInfo, which asks QEMU twice (2-4 ms per disk, of a ~90 ms incremental)."""
    if disk.format == "qcow2":
        with suppress(OSError), open(disk.path, "rb") as image:
            size = qcow2.header_size(image.read(32))
            if size is not None:
                return size
    return int(dom.blockInfo(disk.dev)[0])


def _begin(dom: libvirt.virDomain, xml: str, job: _Job, disks: list[VmDisk], skipped: list[str],
           parent: Manifest | None, checkpoint: str, notes: list[str], log: Log,
           may_freeze: Callable[[], None]) -> tuple[Manifest | None, bool]:
    """Start the pull job (guest frozen around it when the agent answers); the parent it really builds on, and
    whether the guest was frozen (the notes say why not).

    `may_freeze` is called before the freeze is tried: it journals that a recovery must thaw.
    """
    frozen_error = _freeze(dom, xml, may_freeze)
    if frozen_error is not None:
        notes.append(f"not frozen (crash-consistent): {frozen_error}")
    since = None if parent is None else parent.checkpoint
    flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL  # the scratch files are ours
    try:
        job.make_scratch()
        try:
            dom.backupBegin(backup_xml(job.socket, job.dir, disks, skipped, since),
                            checkpoint_xml(checkpoint, disks, skipped), flags)
        except libvirt.libvirtError as err:
            if parent is None or err.get_error_code() != libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT:
                raise BackupFailed(err.get_error_message()) from None
            # A bitmap broken by a crash of QEMU: drop that checkpoint and start a new chain at once.
            notes.append(f"full: checkpoint {parent.checkpoint} is broken ({err.get_error_message()})")
            delete_checkpoint(dom, str(parent.checkpoint), disks, log)
            parent = None
            job.make_scratch()
            dom.backupBegin(backup_xml(job.socket, job.dir, disks, skipped, None),
                            checkpoint_xml(checkpoint, disks, skipped), flags)
    finally:
        if frozen_error is None:
            _thaw(dom, log)
    return parent, frozen_error is None


def _retire_checkpoints(dom: libvirt.virDomain, checkpoints: list[str], parent: Manifest | None, disks: list[VmDisk],
                        log: Log) -> None:
    """Delete our checkpoints other than the one this run starts from: they keep bitmaps up to date for nobody.

    Done before the job: a delete takes ~2.5 ms then, while during a job QEMU first drains the reads
    in flight (stalls of up to 30 ms measured) and after it libvirt makes the delete wait for the job's
    teardown. The parent's checkpoint is kept until the next run, so a failed run is still followed
    by an incremental.
    """
    keep = None if parent is None else parent.checkpoint
    for name in checkpoints:
        if name != keep:
            delete_checkpoint(dom, name, disks, log)


def _end_job(dom: libvirt.virDomain, job: _Job) -> None:
    """A pull job ends only when aborted (libvirt then reports it 'canceled': that is its normal end). Only ours:
    a begin that failed may have met another tool's job (a backup, a migration), which runs on.

    Waits until it has ended, so that the undo of a failed run, which comes next, finds no job. It found one once
    (in six runs of the full-target test on a loaded machine) and left the run's partial files; likely the aborted
    job, still ending, with its backup XML gone, taken for another tool's job. Not reproduced in 27 tries."""
    with suppress(libvirt.libvirtError):
        if dom.isActive() and jobs.active(dom) and _runs_our_job(dom, job.dir):
            dom.abortJob()
            jobs.wait_until_ended(dom, 60.0)


def _plan_disks(job: _Job, disks: list[VmDisk], parent: Manifest | None,
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


def _check_scratch_space(job: _Job, disks: list[VmDisk]) -> None:
    """Refuse before the job starts when the scratch files might not fit in the job dir's filesystem.

    While the job runs, QEMU copies the old content of each cluster the guest overwrites into the disk's
    scratch file first, once per cluster; a cluster that held no data costs nothing (measured in the lab:
    8 MiB written over holes grew the scratch file by 64 KiB, 4 MiB over data by 4 MiB). So the scratch
    files need at most the data the images hold: their allocated size (capped at the virtual size; for a
    block device, an LV, its whole size). That is the worst case, a guest rewriting all its data during
    the backup, and the one checked: backup-notes.md §5 says never to let the scratch location fill up
    (what QEMU 7.2 then does to the guest's writes was not tried here). Data in a qcow2's backing file is
    not counted: a template under every VM's image would be counted once per VM.
    """
    needed = sum(_data_size(disk, job.sizes[disk.dev]) for disk in disks)
    try:
        stats = os.statvfs(job.dir.parent)
    except FileNotFoundError:
        raise BackupFailed(f"[backup] scratch_dir {job.dir.parent} does not exist: `fab kvm-setup`"
                           " creates it") from None
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise BackupFailed(f"the scratch space {job.dir.parent} is too small for this backup: the guest's writes"
                           f" during the job may need up to {needed >> 20} MiB there (the data its disks hold),"
                           f" {free >> 20} MiB are free: free space on that filesystem, or set [backup] scratch_dir"
                           " to a directory with room")


def _data_size(disk: VmDisk, virtual_size: int) -> int:
    with suppress(OSError):
        info = os.stat(disk.path)
        if stat.S_ISREG(info.st_mode):
            return min(info.st_blocks * 512, virtual_size)
    return virtual_size


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
    _refuse_another_job(dom)
    points = store.points()
    checkpoints = [cp.getName() for cp in our_checkpoints(dom)]
    parent, why_full = _decide_incremental(checkpoints, disks, points, settings, store)
    notes: list[str] = []
    if parent is None:
        notes.append(f"full: {why_full}")
    notes += left_out(xml)
    _retire_checkpoints(dom, checkpoints, parent, disks, log)
    stamp = _new_time(store)
    checkpoint = CHECKPOINT_PREFIX + stamp
    partial = store.dir / (stamp + PARTIAL)
    started = time.monotonic()
    job = _Job.plan(dom, xml, disks, stamp, settings.scratch_dir)
    _check_scratch_space(job, disks)
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
        parent, frozen = _begin(dom, xml, job, disks, skipped, parent, checkpoint, notes, log, may_freeze)
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
        _end_job(dom, job)
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
