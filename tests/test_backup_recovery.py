"""What a backup run finds before it starts, in the lab (private libvirtd + QEMU under emulation, as test_backup.py):
a point dated ahead of the clock, another tool's job on the VM (when the run starts, recovers, or undoes itself), a
guest an interrupted run may have left frozen, a run stopped once its point was complete, too little scratch space.
Each must end the run with a message that says what to do, never hang or harm."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from kvmconf import lab
from kvmconf.backup import checkpoints, journal, pull_job
from kvmconf.backup.engine import Outcome, Settings, backup_vm
from kvmconf.backup.libvirt_xml import backup_xml, checkpoint_xml, domain_disks, qemu_owner
from kvmconf.backup.store import VmStore
from tests import test_backup
from tests.labs import another_tools_backup_running, quiet, running_lab, start_another_tools_backup
from tests.test_backup import define, guest_write, make_disk, ok
from tests.tools import mount_tmpfs

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-bkrec-"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def small_scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 12 MiB filesystem for the job's scratch files, mounted before the lab starts (its daemons see only the
    mounts that existed when their mount namespace was made)."""
    with mount_tmpfs(tmp_path_factory.mktemp("scratch"), "12m") as scratch:
        yield scratch


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory, small_scratch: Path) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)


conn = test_backup.conn  # the fixture, run on this module's the_lab
name = test_backup.name


def settings_in(tmp_path: Path) -> Settings:
    (tmp_path / "backups").mkdir(exist_ok=True)  # the [backup] dir, as `fab kvm-setup` makes it
    return Settings(tmp_path / "backups", full_every=5)


def stale_journal(store: VmStore, stamp: str = "20260101T000000Z", partial_left: bool = True,
                  **extra: object) -> dict[str, Any]:
    """What a run killed (SIGKILL) after it had journalled its job leaves: the journal and its partial point
    (``partial_left=False``: killed once that point was moved into place, before the journal was cleared)."""
    entry: dict[str, Any] = {"time": stamp, "checkpoint": f"kvmconf-{stamp}", "pid": 999999,
                             "partial": f"{stamp}.partial",
                             "job_dir": f"{pull_job.SCRATCH_DIR}/kvmconf-backup-999999-{stamp}", **extra}
    journal.write(store.dir, entry)
    if partial_left:
        (store.dir / entry["partial"]).mkdir()
    return entry


def _first_point_dated_ahead(conn: libvirt.virConnect, tmp_path: Path, name: str,
                             suffix: str) -> tuple[libvirt.virDomain, Settings, str]:
    """A VM with one point, its directory renamed to a time two hours ahead of the clock plus `suffix`: the VM, the
    settings and that time."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    first = ok(backup_vm(dom, settings, 5, quiet)).manifest
    assert first is not None
    store = VmStore(settings.dir, name)
    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).strftime("%Y%m%dT%H%M%SZ")
    store.point_dir(first.time).rename(store.dir / (ahead + suffix))
    return dom, settings, ahead


def _backup_within(dom: libvirt.virDomain, settings: Settings, seconds: float) -> list[Outcome]:
    """A backup's outcome, in a list that is empty when the run did not end within `seconds` (it is left to run)."""
    outcomes: list[Outcome] = []
    run = threading.Thread(target=lambda: outcomes.append(backup_vm(dom, settings, 5, quiet)), daemon=True)
    run.start()
    run.join(seconds)
    return outcomes


def test_a_point_dated_ahead_of_the_clock_fails_the_run_instead_of_blocking_every_later_one(
        conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """A point made while the clock was wrong (a boot before NTP): the run used to wait for a later second
    forever, holding the VM's lock, and every later cron run failed with 'another backup is running'."""
    dom, settings, ahead = _first_point_dated_ahead(conn, tmp_path, name, "")
    store = VmStore(settings.dir, name)
    for _ in range(2):  # the second run is not locked out by the first: it fails the same way
        outcomes = _backup_within(dom, settings, 60)
        assert outcomes, "the run did not end: it waits for its clock to pass the point's time"
        [outcome] = outcomes
        assert not outcome.ok
        said = re.fullmatch(re.escape(f"the restore point {store.point_dir(ahead)} is dated ") + r"(\d+)"
                            + re.escape(" s ahead of this host's clock (") + r"\d{8}T\d{6}Z"
                            + re.escape("): a new point must sort after it. Check the clock (NTP); if it is right,"
                                        " move that point out of the directory or remove it"), outcome.error)
        assert said is not None, outcome.error
        assert 7000 < int(said.group(1)) <= 7200, said.group(1)
    assert dom.isActive() and not store.partials() and not (store.dir / journal.JOURNAL).exists()


@pytest.mark.parametrize("aside", [".damaged", ".old"])
def test_a_point_renamed_out_of_the_way_does_not_make_the_next_run_wait_for_its_time(
        conn: libvirt.virConnect, tmp_path: Path, name: str, aside: str) -> None:
    """A point dated ahead of the clock, renamed in place as a manifest that does not parse is told to be
    (<time>.damaged) or by the admin (<time>.old): no point any more, it made the next run wait until the clock
    passed its time, holding the VM's lock, so the cron run never reached the next VMs."""
    dom, settings, ahead = _first_point_dated_ahead(conn, tmp_path, name, aside)
    store = VmStore(settings.dir, name)
    outcomes = _backup_within(dom, settings, 60)
    assert outcomes, f"the run did not end: it waits for its clock to pass {ahead}{aside}, which is no point"
    [outcome] = outcomes
    assert ok(outcome).manifest is not None and outcome.manifest.kind == "full"
    assert outcome.manifest.time < ahead and (store.dir / (ahead + aside)).is_dir()


def test_recovery_leaves_another_tools_backup_job_alone(conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """A stale journal used to make recovery abort whatever job ran on the VM (another tool's pull backup here;
    a live migration alike): it now fails, changing nothing, and recovers once that job has ended. A real second
    pull job stands for the other tool; a migration cannot run in the lab (one libvirtd)."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    store.dir.mkdir()
    entry = stale_journal(store)
    with another_tools_backup_running(dom, tmp_path) as other_socket:
        outcome = backup_vm(dom, settings, 5, quiet)
        assert not outcome.ok
        assert outcome.error == ("another job runs on the VM (operation: backup), not the backup job of the"
                                 " interrupted run 20260101T000000Z: it and what that run left are left alone; run"
                                 " the backup again when it has ended"), outcome.error
        assert f"socket='{other_socket}'" in dom.backupGetXMLDesc(0)  # the other job still runs
        assert journal.read(store.dir) == entry and (store.dir / entry["partial"]).is_dir()
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert f"removed the partial backup {entry['partial']}" in outcome.notes


def test_a_journal_that_does_not_parse_is_recovered_from_not_a_failure_of_every_later_run(
        conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """A power cut right after a rename that was not flushed can leave the journal empty (XFS does). Every later run
    used to fail on it ("unexpected error ... a bug"). Here the killed run's pull job (in a job dir of ours) and its
    checkpoint are real; the journal naming them is empty."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    store.dir.mkdir()
    stamp = "20260101T000000Z"
    # The killed run's job dir, named as the engine names it, where it puts it (a socket path under tmp_path would be
    # too long for QEMU); a lost journal does not name it: recovery finds it from the job's socket.
    job_dir = pull_job.SCRATCH_DIR / f"{pull_job.JOB_DIR_PREFIX}{os.getpid()}-{stamp}"
    job_dir.mkdir()
    try:
        xml = dom.XMLDesc(0)
        disks, skipped = domain_disks(xml)
        if (owner := qemu_owner(xml)) is not None:
            os.chown(job_dir, *owner)
        dom.backupBegin(backup_xml(job_dir / "nbd.sock", job_dir, disks, skipped, None),
                        checkpoint_xml(f"{checkpoints.CHECKPOINT_PREFIX}{stamp}", disks, skipped), 0)
        (store.dir / f"{stamp}.partial").mkdir()
        (store.dir / journal.JOURNAL).write_text("")
        outcome = ok(backup_vm(dom, settings, 5, quiet))
        assert not job_dir.exists()  # its scratch file can hold as much as the guest overwrote during the job
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    assert outcome.notes[:3] == [
        f"{store.dir / journal.JOURNAL} does not parse (Expecting value: line 1 column 1 (char 0)): undoing what the"
        " interrupted run it described may have left",
        "aborted the backup job of the interrupted run (its journal does not parse)",
        f"removed the partial backup {stamp}.partial"], outcome.notes
    assert outcome.manifest is not None and outcome.manifest.kind == "full"
    # The killed run's checkpoint, which the journal no longer named, is retired with the other unused ones.
    assert [cp.getName() for cp in dom.listAllCheckpoints()] == [outcome.manifest.checkpoint]
    assert not (store.dir / journal.JOURNAL).exists() and not store.partials()


def test_the_job_dir_of_a_run_whose_journal_was_lost_is_removed_though_its_job_has_ended(
        conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """The journal named the job dir, and a job still running names it by its socket; with the journal lost and the
    job ended (QEMU restarted, or the run killed after it aborted its job), nothing did: its scratch files, as large
    as what the guest overwrote during the job, stayed in scratch_dir for good. The dir now names its VM."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    store.dir.mkdir()
    ours, other = (settings.scratch_dir / f"{pull_job.JOB_DIR_PREFIX}{pid}-20260101T000000Z"
                   for pid in (999998, 999999))
    for job_dir, vm in ((ours, name), (other, f"{name}x")):
        job_dir.mkdir()
        (job_dir / pull_job.JOB_OWNER).write_text(vm)
        (job_dir / "vda.scratch").write_bytes(b"what the guest overwrote")
    (store.dir / journal.JOURNAL).write_text("")
    try:
        outcome = ok(backup_vm(dom, settings, 5, quiet))
        assert f"removed {ours}, the job dir of a run whose journal was lost" in outcome.notes, outcome.notes
        assert not ours.exists()
        assert (other / "vda.scratch").is_file()  # another VM's: its own run may be using it
    finally:
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)


def test_the_job_dir_of_a_job_that_still_runs_is_kept_though_no_journal_names_it(
        conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """No journal at all (deleted by hand), and the dead run's job still exports from its dir: nothing aborts that job,
    and the backup is refused while it runs; its socket and scratch files stay with it."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    job_dir = pull_job.SCRATCH_DIR / f"{pull_job.JOB_DIR_PREFIX}{os.getpid()}-20260101T000000Z"
    job_dir.mkdir()
    try:
        (job_dir / pull_job.JOB_OWNER).write_text(name)
        xml = dom.XMLDesc(0)
        disks, skipped = domain_disks(xml)
        if (owner := qemu_owner(xml)) is not None:
            os.chown(job_dir, *owner)
        dom.backupBegin(backup_xml(job_dir / "nbd.sock", job_dir, disks, skipped, None), None, 0)
        outcome = backup_vm(dom, settings, 5, quiet)
        assert not outcome.ok and "another job" in outcome.error, outcome.error
        assert (job_dir / "nbd.sock").exists() and f"socket='{job_dir}/nbd.sock'" in dom.backupGetXMLDesc(0)
        dom.abortJob()
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def test_a_run_stopped_once_its_point_was_complete_keeps_its_checkpoint(conn: libvirt.virConnect, tmp_path: Path,
                                                                         name: str) -> None:
    """Stopped between moving its point into place and clearing its journal (a SIGTERM during the directory's
    fsync): recovery used to delete the checkpoint of that good point, and the next backup was a full."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    first = ok(backup_vm(dom, settings, 5, quiet)).manifest
    assert first is not None
    assert stale_journal(store, first.time, partial_left=False)["checkpoint"] == first.checkpoint
    guest_write(dom, 0, 0x33, "0", "1M")
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert outcome.manifest is not None and outcome.manifest.kind == "incremental", outcome.notes
    assert outcome.manifest.parent == first.time
    assert f"the interrupted run {first.time} had finished its point: nothing to undo" in outcome.notes
    assert [m.time for m in store.points()] == [first.time, outcome.manifest.time]


def test_a_run_that_finds_another_tools_job_running_leaves_it_running(conn: libvirt.virConnect, tmp_path: Path,
                                                                        name: str) -> None:
    """libvirt runs one job per VM: the run's begin waited 30 s, failed saying it could not acquire a lock, and its
    clean-up aborted the job that was there (a virtnbdbackup run, a migration) as if it were its own."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    with another_tools_backup_running(dom, tmp_path) as other_socket:
        outcome = backup_vm(dom, settings, 5, quiet)
        assert not outcome.ok
        assert outcome.error == ("another job runs on the VM (operation: backup): it is left alone; run the backup"
                                 " again when it has ended"), outcome.error
        assert f"socket='{other_socket}'" in dom.backupGetXMLDesc(0)  # still runs
        store = VmStore(settings.dir, name)
        assert dom.listAllCheckpoints() == [] and not store.partials() and not (store.dir / journal.JOURNAL).exists()


class _InterruptedAsAnotherToolStarts:
    """The lab's VM, whose backupBegin meets a Ctrl-C just as another tool's job starts on it. Every other call
    goes to the real domain."""

    def __init__(self, dom: libvirt.virDomain, tmp_path: Path) -> None:
        self._dom = dom
        self._tmp_path = tmp_path

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._dom, attr)

    def backupBegin(self, *_args: object) -> int:  # libvirt's name
        start_another_tools_backup(self._dom, self._tmp_path)
        raise KeyboardInterrupt


def test_an_interrupt_is_not_replaced_by_the_refusal_to_touch_another_tools_job(conn: libvirt.virConnect,
                                                                                tmp_path: Path, name: str) -> None:
    """The run undoes itself on Ctrl-C; finding a job that is not its own, that recovery refuses and leaves the run's
    leftovers to the next one. The Ctrl-C must still end the run (the next VM of --all must not start)."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    with another_tools_backup_running(dom, tmp_path, start=False) as other_socket:
        with pytest.raises(KeyboardInterrupt):
            backup_vm(_InterruptedAsAnotherToolStarts(dom, tmp_path), settings, 5, quiet)  # type: ignore[arg-type]
        assert f"socket='{other_socket}'" in dom.backupGetXMLDesc(0)  # left alone
        assert journal.read(store.dir) is not None and store.partials()  # for the next run to recover
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert any(n.startswith("removed the partial backup") for n in outcome.notes), outcome.notes


class _InterruptedAsLibvirtdGoes:
    """The lab's VM, whose backupBegin meets a Ctrl-C just as libvirtd goes away: every later call fails as libvirt
    then fails. The calls before go to the real domain."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self._dom = dom
        self._gone = False

    def __getattr__(self, attr: str) -> Any:
        if self._gone:
            raise libvirt.libvirtError("End of file while reading data: Input/output error")
        return getattr(self._dom, attr)

    def backupBegin(self, *_args: object) -> int:  # libvirt's name
        self._gone = True
        raise KeyboardInterrupt


def test_an_interrupt_is_not_replaced_by_a_libvirt_error_in_the_undo(conn: libvirt.virConnect, tmp_path: Path,
                                                                     name: str) -> None:
    """An undo that fails for any reason (libvirtd gone, a disk error) leaves the run's leftovers to the next run;
    it used to replace the Ctrl-C with its own error, and `backup --all` went on to the next VM."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    with pytest.raises(KeyboardInterrupt):
        backup_vm(_InterruptedAsLibvirtdGoes(dom), settings, 5, quiet)  # type: ignore[arg-type]
    assert journal.read(store.dir) is not None and store.partials()  # for the next run to recover
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert any(n.startswith("removed the partial backup") for n in outcome.notes), outcome.notes


class _Watched:
    """The lab's VM through a thin wrapper: the lab's VMs have no OS, so no guest agent, and a freeze or thaw
    can never succeed or be observed there. Every call but the two overridden ones goes to the real domain."""

    def __init__(self, dom: libvirt.virDomain, store: VmStore, thaw_works: bool) -> None:
        self._dom = dom
        self._store = store
        self._thaw_works = thaw_works
        self.journal_at_freeze: dict[str, Any] | None = None
        self.thawed = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._dom, attr)

    def fsFreeze(self) -> int:  # libvirt's names
        self.journal_at_freeze = journal.read(self._store.dir)
        return int(self._dom.fsFreeze())  # fails: no agent answers

    def fsThaw(self) -> int:
        self.thawed += 1
        return 0 if self._thaw_works else int(self._dom.fsThaw())


def test_the_journal_says_frozen_before_the_guest_is_frozen(conn: libvirt.virConnect, tmp_path: Path,
                                                            name: str) -> None:
    """A run killed between freeze and thaw must leave the next run a record that it has to thaw."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")], agent_channel=True)
    settings = settings_in(tmp_path)
    watched = _Watched(dom, VmStore(settings.dir, name), thaw_works=True)
    ok(backup_vm(watched, settings, 5, quiet))
    assert watched.journal_at_freeze is not None and watched.journal_at_freeze.get("frozen") is True


def test_recovery_thaws_a_guest_an_interrupted_run_may_have_left_frozen(conn: libvirt.virConnect, tmp_path: Path,
                                                                        name: str) -> None:
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")], agent_channel=True)
    settings = settings_in(tmp_path)
    store = VmStore(settings.dir, name)
    store.dir.mkdir()
    # The real libvirt: no agent answers, so the thaw fails; said, and the run goes on.
    stale_journal(store, frozen=True)
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    [note] = [n for n in outcome.notes if n.startswith("could not thaw")]
    assert note.startswith("could not thaw the guest's filesystems the interrupted run may have left frozen: Guest"
                           " agent is not responding"), note
    # A thaw that works (the wrapper stands in for an agent the lab's VMs cannot have).
    stale_journal(store, frozen=True)
    watched = _Watched(dom, store, thaw_works=True)
    outcome = ok(backup_vm(watched, settings, 5, quiet))
    assert watched.thawed == 1
    assert "thawed the guest's filesystems the interrupted run may have left frozen" in outcome.notes
    # No flag, no thaw: a run that never reached the freeze.
    stale_journal(store)
    watched = _Watched(dom, store, thaw_works=True)
    ok(backup_vm(watched, settings, 5, quiet))
    assert watched.thawed == 0


def test_too_little_scratch_space_is_refused_before_the_job_starts(small_scratch: Path, conn: libvirt.virConnect,
                                                                   tmp_path: Path, name: str) -> None:
    """Scratch files that cannot grow make QEMU fail the guest's own writes: refused up front, with the numbers."""
    disk = make_disk(tmp_path / "vda.qcow2", "qcow2", 64)
    dom = define(conn, name, [(disk, "qcow2")])
    guest_write(dom, 0, 0x5A, "0", "40M")
    settings = dataclasses.replace(settings_in(tmp_path), scratch_dir=small_scratch)  # [backup] scratch_dir
    outcome = backup_vm(dom, settings, 5, quiet)
    assert not outcome.ok
    needed = os.stat(disk).st_blocks * 512 >> 20
    stats = os.statvfs(small_scratch)
    free = stats.f_bavail * stats.f_frsize >> 20
    assert 40 <= needed < 64 and free <= 12
    assert outcome.error == (f"the scratch space {small_scratch} is too small for this backup: the guest's writes"
                             f" during the job may need up to {needed} MiB there (the data its disks hold), {free} MiB"
                             " are free: free space on that filesystem, or set [backup] scratch_dir to a directory"
                             " with room"), outcome.error
    store = VmStore(settings.dir, name)
    assert store.points() == [] and store.partials() == [] and not (store.dir / journal.JOURNAL).exists()
    assert dom.listAllCheckpoints() == [] and dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert list(small_scratch.iterdir()) == []


def test_a_bitmap_that_cannot_be_removed_from_a_shut_off_vms_image_is_said(conn: libvirt.virConnect, tmp_path: Path,
                                                                           name: str) -> None:
    """Deleting a checkpoint of a shut-off VM removes only its bitmap from the images with qemu-img; a failure
    (here: the bitmap is gone already) used to be dropped without a word."""
    disk = make_disk(tmp_path / "vda.qcow2", "qcow2", 16)
    dom = define(conn, name, [(disk, "qcow2")])
    point = ok(backup_vm(dom, settings_in(tmp_path), 5, quiet)).manifest
    assert point is not None and point.checkpoint is not None
    dom.destroy()
    subprocess.run(["qemu-img", "bitmap", "--remove", str(disk), point.checkpoint], check=True)
    said: list[str] = []
    disks, _ = domain_disks(dom.XMLDesc(0))
    assert checkpoints.delete_checkpoint(dom, point.checkpoint, disks, said.append)
    assert dom.listAllCheckpoints() == []
    cp = point.checkpoint
    assert said == [f"{name}: checkpoint {cp}: Operation not supported: cannot delete checkpoint for inactive domain;"
                    " removing its metadata only",
                    f"{name}: could not remove bitmap {cp} from {disk}: qemu-img: Operation remove on bitmap {cp}"
                    f" failed: Dirty bitmap '{cp}' not found"]
