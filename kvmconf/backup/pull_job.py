"""A running VM's pull-mode backup job: its directory (NBD socket, scratch files), its begin with the guest frozen
around it, its end, and telling it apart from another tool's job on the same VM.

libvirt runs one job per VM and a pull job lasts until it is aborted, so both the run that began it and a later
recovery must know whether the job they see is theirs: the job's NBD socket is in a directory named as ours are.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import libvirt

from kvmconf import jobs
from kvmconf.backup import qcow2
from kvmconf.backup.checkpoints import delete_checkpoint
from kvmconf.backup.failures import BackupFailed
from kvmconf.backup.libvirt_xml import VmDisk, backup_socket, backup_xml, checkpoint_xml, has_guest_agent, qemu_owner
from kvmconf.backup.store import Manifest

Log = Callable[[str], None]

SCRATCH_DIR = Path("/var/tmp")  # [backup] scratch_dir's default: the job's socket and scratch files, see JobDir
JOB_DIR_PREFIX = "kvmconf-backup-"  # + PID and time: a run's NBD socket and scratch files, in [backup] scratch_dir
JOB_OWNER = "vm"  # in a job dir: the VM whose run made it, so that a run whose journal was lost is still cleaned up


@dataclass(frozen=True)
class JobDir:
    """Where a pull job's NBD socket and scratch files go: private to QEMU (it creates the socket) and root.

    Short (a unix socket path has at most 107 bytes) and outside /run (QEMU may have a /run of its
    own). The name is known before it exists, so the journal can name it first.
    """

    dir: Path
    sizes: dict[str, int]  # dev -> virtual size
    owner: tuple[int, int] | None  # QEMU's uid and gid
    vm: str  # written into the dir (JOB_OWNER): a VM name can be too long for the socket's path

    @classmethod
    def plan(cls, dom: libvirt.virDomain, xml: str, disks: list[VmDisk], stamp: str, scratch_dir: Path) -> JobDir:
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


def check_scratch_space(job: JobDir, disks: list[VmDisk]) -> None:
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


def begin(dom: libvirt.virDomain, xml: str, job: JobDir, disks: list[VmDisk], skipped: list[str],
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


def end(dom: libvirt.virDomain, job: JobDir) -> None:
    """A pull job ends only when aborted (libvirt then reports it 'canceled': that is its normal end). Only ours:
    a begin that failed may have met another tool's job (a backup, a migration), which runs on.

    Waits until it has ended, so that the undo of a failed run, which comes next, finds no job. It found one once
    (in six runs of the full-target test on a loaded machine) and left the run's partial files; likely the aborted
    job, still ending, with its backup XML gone, taken for another tool's job. Not reproduced in 27 tries."""
    with suppress(libvirt.libvirtError):
        if dom.isActive() and jobs.active(dom) and runs_our_job(dom, job.dir):
            dom.abortJob()
            jobs.wait_until_ended(dom, 60.0)


def refuse_another_job(dom: libvirt.virDomain) -> None:
    """libvirt runs one job per VM: a backup begun beside another would wait 30 s for it, then fail saying only
    that it could not acquire a lock."""
    if jobs.active(dom):
        raise BackupFailed(f"another job runs on the VM ({jobs.describe(dom)}): it is left alone; run the backup"
                           " again when it has ended")


def runs_our_job(dom: libvirt.virDomain, job_dir: Path | None) -> bool:
    """Whether the VM's job is the backup job of the run whose job dir this is (its NBD socket is in it); with
    None, of any run of ours (its socket is in a job dir named as ours are)."""
    found = job_dir_of(dom)
    if found is None:
        return False
    return found == job_dir if job_dir else found.name.startswith(JOB_DIR_PREFIX)


def job_dir_of(dom: libvirt.virDomain) -> Path | None:
    """The directory of the VM's pull-mode backup job's NBD socket; None without such a job."""
    try:
        socket = backup_socket(dom.backupGetXMLDesc(0))
    except libvirt.libvirtError:  # no backup job: a migration, a block job of another tool, ...
        return None
    return None if socket is None else Path(socket).parent
