"""Recovery: undo what an interrupted backup run of a VM left, before anything else runs on that VM's store.

The run's journal names what it started (its point's time, checkpoint, job dir, whether it may have frozen the
guest); a lost or damaged journal is made up for by what can be found (the job's socket, the VM's name in a job
dir). See recover.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import libvirt

from kvmconf import jobs
from kvmconf.backup import journal
from kvmconf.backup.checkpoints import delete_checkpoint
from kvmconf.backup.failures import BackupFailed
from kvmconf.backup.libvirt_xml import domain_disks, has_guest_agent
from kvmconf.backup.pull_job import JOB_DIR_PREFIX, JOB_OWNER, job_dir_of, runs_our_job
from kvmconf.backup.store import VmStore

Log = Callable[[str], None]

_POLL = 0.05
FROZEN = "frozen"  # in the journal once the guest may be frozen: recovery thaws it


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
        # Its checkpoint, not named, is deleted with the other unused ones by the next backup (retire_checkpoints);
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
                entry["job_dir"] = str(job_dir_of(dom))
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
    running = job_dir_of(dom) if dom is not None and dom.isActive() else None
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
    if job_dir and runs_our_job(dom, Path(job_dir)):
        return
    if "job_dir" not in entry and runs_our_job(dom, None):
        return
    raise BackupFailed(f"another job runs on the VM ({jobs.describe(dom)}), not the backup job of the interrupted"
                       f" run {entry.get('time')}: it and what that run left are left alone; run the backup again"
                       " when it has ended")


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
