"""Live backups and restores against running VMs in the lab (private libvirtd + QEMU under emulation).

The VMs have no OS (their CPU halts at once, see kvmconf/bare_vm.py); "guest" writes go through the
QEMU monitor's qemu-io on the virtio device's BlockBackend, which marks the dirty bitmaps exactly as
guest writes do. The expected content of each restore point is rebuilt independently: a raw image
with the same writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from kvmconf import bare_vm, lab, processes
from kvmconf.backup import durability, journal
from kvmconf.backup import restore as restore_module
from kvmconf.backup.engine import SCRATCH_DIR, Outcome, Settings, backup_vm
from kvmconf.backup.restore import RestoreFailed, restore
from kvmconf.backup.store import Manifest, VmStore, checksum_file
from tests.labs import FIXTURES, quiet, require_lab, running_lab
from tests.tools import PRINT_STACKS_ON_SIGUSR1, ROOT, mount_tmpfs, output_unless_hung

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-bktest-"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 12 MiB filesystem for the full-target test, mounted before the lab starts: the lab's daemons run
    in a mount namespace of their own, which sees only the mounts that existed when it was made."""
    require_lab()
    with mount_tmpfs(tmp_path_factory.mktemp("small"), "12m") as mounted:
        yield mounted


def backup_dir(parent: Path) -> Path:
    """The [backup] dir, made as `fab kvm-setup` makes it: a backup never creates it (an unmounted disk's)."""
    (parent / "backups").mkdir(exist_ok=True)
    return parent / "backups"


@pytest.fixture
def nas(tmp_path: Path) -> Iterator[Path]:
    """The NAS: a filesystem of its own, as an NFS share is (the NAS stage refuses the [backup] dir's own)."""
    require_lab()
    with mount_tmpfs(tmp_path / "nas", "256m") as mounted:
        yield mounted


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory, small_fs: Path) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)
    _remove_orphaned_job_dirs()


def _remove_orphaned_job_dirs() -> None:
    """Job directories of backup processes that are gone (killed by these tests, or by a killed earlier run).

    In production the VM's journal names them for the next run's recovery; here the VMs' backup
    directories are temporary, so nothing else would remove them.
    """
    for job_dir in SCRATCH_DIR.glob("kvmconf-backup-*-*"):
        pid = job_dir.name.split("-")[2]
        if pid.isdigit() and not processes.alive(int(pid)):
            shutil.rmtree(job_dir, ignore_errors=True)


@pytest.fixture
def conn(the_lab: lab.Lab) -> Iterator[libvirt.virConnect]:
    c = libvirt.open(the_lab.uri)
    yield c
    for dom in c.listAllDomains():
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    c.close()


def make_disk(path: Path, fmt: str, size_mb: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), f"{size_mb}M"], check=True)
    return path


def define(conn: libvirt.virConnect, name: str, disks: list[tuple[Path, str]], start: bool = True,
           agent_channel: bool = False) -> libvirt.virDomain:
    floppy = bare_vm.halting_floppy(disks[0][0].parent / "halt.img")
    dom = conn.defineXML(bare_vm.domain_xml(name, disks, floppy, agent_channel=agent_channel))
    if start:
        dom.create()
    return dom


class Expected:
    """The disk's content as the guest wrote it: the same writes replayed on a raw image."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = make_disk(path, "raw", size_mb)

    def write(self, pattern: int, offset: str, length: str) -> None:
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {offset} {length}", str(self.path)],
                       check=True, capture_output=True)

    def snapshot(self, path: Path) -> Path:
        subprocess.run(["cp", "--sparse=always", str(self.path), str(path)], check=True)
        return path


def guest_write(dom: libvirt.virDomain, index: int, pattern: int, offset: str, length: str,
                expected: Expected | None = None) -> None:
    device = f"/machine/peripheral/virtio-disk{index}/virtio-backend"  # libvirt's alias for vd<a+index>
    command = f'qemu-io -d {device} "write -P {pattern:#x} {offset} {length}"'
    out = libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    assert not out.strip(), out  # HMP qemu-io prints only errors
    if expected is not None:
        expected.write(pattern, offset, length)


def store_dir(settings: Settings, name: str) -> Path:
    return VmStore(settings.dir, name).dir


def compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, check=False)


def ok(outcome: Outcome) -> Outcome:
    assert outcome.ok and not outcome.error, outcome
    return outcome


@pytest.fixture
def name() -> str:
    return f"bk{os.getpid()}{time.monotonic_ns() % 100000}"


def test_full_incremental_restore_each_point_and_nas(conn: libvirt.virConnect, tmp_path: Path, name: str,
                                                     nas: Path) -> None:
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 64), "qcow2")])
    expected = Expected(tmp_path / "expected.raw", 64)
    settings = Settings(backup_dir(tmp_path), full_every=5, nas_dir=nas)
    snapshots = []

    full = ok(backup_vm(dom, settings, 5, quiet)).manifest
    snapshots.append(expected.snapshot(tmp_path / "at0.raw"))
    assert dom.isActive()
    guest_write(dom, 0, 0x5A, "0", "4M", expected)
    inc1 = ok(backup_vm(dom, settings, 5, quiet)).manifest
    snapshots.append(expected.snapshot(tmp_path / "at1.raw"))
    assert dom.isActive()
    guest_write(dom, 0, 0x33, "20M", "2M", expected)
    guest_write(dom, 0, 0x77, "1M", "1M", expected)  # overwrites part of the first write
    inc2 = ok(backup_vm(dom, settings, 5, quiet)).manifest
    snapshots.append(expected.snapshot(tmp_path / "at2.raw"))
    assert dom.isActive()

    assert full is not None and inc1 is not None and inc2 is not None
    assert (full.kind, inc1.kind, inc2.kind) == ("full", "incremental", "incremental")
    assert inc2.parent == inc1.time and inc1.parent == full.time and inc2.chain == full.time
    # Incrementals hold about what was written (4 MiB, then 3 MiB), nowhere near the 64 MiB disk.
    assert 4 * MIB <= inc1.stored < 6 * MIB, inc1.stored
    assert 3 * MIB <= inc2.stored < 5 * MIB, inc2.stored
    # The newest checkpoint and the one its job started from; older ones were deleted before a job.
    assert {cp.getName() for cp in dom.listAllCheckpoints()} == {inc1.checkpoint, inc2.checkpoint}

    store = VmStore(settings.dir, name)
    for point, snapshot in zip((full, inc1, inc2), snapshots, strict=True):
        out = restore(store, point.time, tmp_path / f"restored-{point.time}.raw", None, False, quiet)
        assert out == [tmp_path / f"restored-{point.time}.raw"]
        result = compare(out[0], snapshot)
        assert result.returncode == 0, result.stdout
    # The checksums check by hand with the stock tool, as the store's docstring tells the admin.
    for point in (full, inc1, inc2):
        sums = subprocess.run(["xxhsum", "-c", "XXH128SUMS"], cwd=store.point_dir(point.time), capture_output=True,
                              text=True, check=False)
        assert (sums.returncode, sums.stdout) == (0, "vda.qcow2: OK\n"), sums
    # Stock qemu-img reads the chain: the newest incremental names its parent as backing file.
    info = subprocess.run(["qemu-img", "info", str(store.point_dir(inc2.time) / "vda.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert f"backing file: ../{inc1.time}/vda.qcow2" in info

    on_nas = VmStore(nas, name)
    assert [m.time for m in on_nas.points()] == [full.time, inc1.time, inc2.time]
    for m in on_nas.points():
        for disk in m.disks:
            assert disk.algorithm == "xxh128" and checksum_file(on_nas.point_dir(m.time) / disk.file) == disk.checksum
    assert compare(on_nas.point_dir(inc2.time) / "vda.qcow2", snapshots[2]).returncode == 0


def test_qcow2_and_raw_disk_in_one_job(conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    dom = define(conn, name, [(make_disk(tmp_path / "a.qcow2", "qcow2", 48), "qcow2"),
                              (make_disk(tmp_path / "b.raw", "raw", 32), "raw")])
    exp_a, exp_b = Expected(tmp_path / "ea.raw", 48), Expected(tmp_path / "eb.raw", 32)
    settings = Settings(backup_dir(tmp_path), full_every=3)
    guest_write(dom, 1, 0x11, "0", "3M", exp_b)
    full = ok(backup_vm(dom, settings, 3, quiet)).manifest
    guest_write(dom, 0, 0x22, "8M", "2M", exp_a)
    guest_write(dom, 1, 0x44, "16M", "1M", exp_b)
    inc = ok(backup_vm(dom, settings, 3, quiet)).manifest
    assert full is not None and inc is not None and inc.kind == "incremental"
    by_dev = {d.dev: d for d in inc.disks}
    assert by_dev["vda"].backing is not None and by_dev["vdb"].backing is None  # the raw disk: whole, every time
    assert by_dev["vdb"].stored < 8 * MIB  # ... but thin
    (tmp_path / "restored").mkdir()  # a VM with several disks is restored into an existing directory
    out = restore(VmStore(settings.dir, name), None, tmp_path / "restored", None, False, quiet)
    assert sorted(p.name for p in out) == [f"{name}-vda.qcow2", f"{name}-vdb.raw"]
    assert compare(tmp_path / "restored" / f"{name}-vda.qcow2", exp_a.path).returncode == 0
    assert compare(tmp_path / "restored" / f"{name}-vdb.raw", exp_b.path).returncode == 0


def test_shut_off_vm_from_its_images_and_in_place_restore(conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    disk = make_disk(tmp_path / "vda.qcow2", "qcow2", 32)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 2M 3M", str(disk)], check=True, capture_output=True)
    dom = define(conn, name, [(disk, "qcow2")], start=False)
    settings = Settings(backup_dir(tmp_path), full_every=3)
    point = ok(backup_vm(dom, settings, 3, quiet)).manifest
    assert point is not None and point.kind == "offline" and point.checkpoint is None
    assert not dom.isActive()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 8M", str(disk)], check=True, capture_output=True)
    store = VmStore(settings.dir, name)
    with pytest.raises(RestoreFailed, match="confirm with --force"):
        restore(store, None, None, dom, False, quiet)
    dom.create()
    with pytest.raises(RestoreFailed, match="is running: shut it off first"):
        restore(store, None, None, dom, True, quiet)
    dom.destroy()
    changed = disk.read_bytes()
    with pytest.raises(RestoreFailed, match=f"{disk} exists already and is never overwritten .*: give --to a new path"):
        restore(store, None, disk, None, False, quiet)  # --to the VM's own disk: no way round --force
    assert disk.read_bytes() == changed and not list(tmp_path.glob("*.partial"))
    restore(store, None, None, dom, True, quiet)
    kept = tmp_path / f"vda.qcow2.before-restore-{point.time}"
    assert kept.read_bytes() == changed  # the replaced disk stays until the restored VM has run
    assert compare(disk, store.point_dir(point.time) / "vda.qcow2").returncode == 0
    restore(store, None, None, dom, True, quiet)  # again, before the VM ran: the first kept disk is not overwritten
    assert kept.read_bytes() == changed
    again = tmp_path / f"vda.qcow2.before-restore-{point.time}.2"
    assert compare(again, store.point_dir(point.time) / "vda.qcow2").returncode == 0
    dom.create()
    # Started while a restore rebuilt its images (they take minutes for big disks): its open disks stay.
    staged = tmp_path / "vda.qcow2.restored"
    shutil.copy(store.point_dir(point.time) / "vda.qcow2", staged)
    running = disk.read_bytes()
    with pytest.raises(RestoreFailed, match="was started during the restore: nothing was replaced"):
        restore_module._swap_in(store, dom, point, [disk], [staged])
    assert disk.read_bytes() == running and not staged.exists()
    ok(backup_vm(dom, settings, 3, quiet))  # running now: both replaced disks go
    assert not kept.exists() and not again.exists()


def test_in_place_restore_from_the_nas_copies_leaves_its_record_where_the_next_backup_looks(
        conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """restore --nas reads the NAS copies, but the lock and the record of the replaced disks are the [backup] dir's,
    where the VM's backups look: in the NAS dir the replaced disk was kept for good, the restore saying that the
    next backup would remove it, and no cron backup was kept out meanwhile."""
    disk = make_disk(tmp_path / "vda.qcow2", "qcow2", 32)
    dom = define(conn, name, [(disk, "qcow2")], start=False)
    settings = Settings(backup_dir(tmp_path), full_every=3)
    point = ok(backup_vm(dom, settings, 3, quiet)).manifest
    assert point is not None
    nas = VmStore(tmp_path / "nas", name)
    shutil.copytree(settings.dir / name / point.time, nas.point_dir(point.time))  # the point's NAS copy
    shutil.rmtree(settings.dir / name)  # the local disk replaced: an empty [backup] dir
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 8M", str(disk)], check=True, capture_output=True)
    local = VmStore(settings.dir, name)
    restore(nas, None, None, dom, True, quiet, home=local)
    kept = tmp_path / f"vda.qcow2.before-restore-{point.time}"
    assert journal.read(local.dir, journal.REPLACED) == {"files": [str(kept)]}
    assert not (nas.dir / journal.REPLACED).exists() and not (nas.dir / journal.LOCK).exists()
    assert compare(disk, nas.point_dir(point.time) / "vda.qcow2").returncode == 0
    dom.create()
    ok(backup_vm(dom, settings, 3, quiet))  # the restored VM runs: the replaced disk goes
    assert not kept.exists()
    # With its [backup] dir not there (the disk not mounted), no backup could ever remove it: refused.
    dom.destroy()
    shutil.rmtree(settings.dir)
    with pytest.raises(RestoreFailed) as refused:
        restore(nas, None, None, dom, True, quiet, home=local)
    assert str(refused.value) == (
        f"{name}: the [backup] dir {settings.dir} does not exist (is its filesystem mounted?), and a restore in place"
        " records there which disks it replaces, for the next backup to remove: mount it (or make it: fab"
        " kvm-setup), or restore with --to")


def test_an_agent_that_does_not_answer_is_said_and_the_backup_goes_on(conn: libvirt.virConnect, tmp_path: Path,
                                                                      name: str) -> None:
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")], agent_channel=True)
    outcome = ok(backup_vm(dom, Settings(backup_dir(tmp_path), full_every=5), 5, quiet))
    assert outcome.manifest is not None and not outcome.manifest.frozen
    [note] = [n for n in outcome.manifest.notes if n.startswith("not frozen (crash-consistent): ")]
    assert "guest agent" in note and "no guest agent channel" not in note, note  # libvirt's own reason


def test_a_manifest_that_does_not_parse_fails_that_backup_naming_the_file(conn: libvirt.virConnect, tmp_path: Path,
                                                                          name: str) -> None:
    """It raised JSONDecodeError out of backup_vm, which stopped `backup --all` for every VM after this one."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")])
    settings = Settings(backup_dir(tmp_path), full_every=5)
    first = ok(backup_vm(dom, settings, 5, quiet)).manifest
    assert first is not None
    manifest = VmStore(settings.dir, name).point_dir(first.time) / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # truncated, as by a crash
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(manifest.read_text())
    outcome = backup_vm(dom, settings, 5, quiet)
    expected = (f"{manifest}: the restore point's manifest does not parse (JSONDecodeError: {parsed.value}):"
                f" rename {manifest.parent} to {manifest.parent}.damaged (any name that is not a point's time) to go"
                " on; the points built on it then cannot be restored")
    assert (outcome.ok, outcome.error) == (False, expected)
    assert journal.read(VmStore(settings.dir, name).dir, journal.LAST_RUN)["error"] == expected  # type: ignore[index]
    manifest.parent.rename(f"{manifest.parent}.damaged")  # as the message says: the VM's backups go on
    ok(backup_vm(dom, settings, 5, quiet))


def test_disk_grown_between_backups(conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """Scratch files must have QEMU's size of each disk, read from the qcow2 header: a resize shows at once."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 32), "qcow2")])
    expected = Expected(tmp_path / "expected.raw", 32)
    guest_write(dom, 0, 0x11, "0", "4M", expected)
    settings = Settings(backup_dir(tmp_path), full_every=5)
    ok(backup_vm(dom, settings, 5, quiet))
    dom.blockResize("vda", 48 * MIB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    os.truncate(expected.path, 48 * MIB)
    guest_write(dom, 0, 0x22, "40M", "2M", expected)
    second = ok(backup_vm(dom, settings, 5, quiet)).manifest
    assert second is not None and second.kind == "incremental" and second.disks[0].virtual_size == 48 * MIB
    out = restore(VmStore(settings.dir, name), second.time, tmp_path / "restored.raw", None, False, quiet)
    result = compare(out[0], expected.path)
    assert result.returncode == 0, result.stdout


def test_retention_keep_2_over_5_runs(conn: libvirt.virConnect, tmp_path: Path, name: str, nas: Path) -> None:
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 32), "qcow2")])
    settings = Settings(backup_dir(tmp_path), full_every=1, nas_dir=nas)
    made = []
    for i in range(5):
        guest_write(dom, 0, 0x10 + i, f"{i}M", "1M")
        m = ok(backup_vm(dom, settings, 2, quiet)).manifest
        assert m is not None
        made.append(m)
    assert [m.kind for m in made] == ["full", "incremental", "full", "incremental", "full"]
    # A full starts from no checkpoint: it retires every older one.
    assert [cp.getName() for cp in dom.listAllCheckpoints()] == [made[4].checkpoint]
    for root in (settings.dir, nas):
        left = [m.time for m in VmStore(root, name).points()]
        # The first chain is gone whole; the chain of the 2nd-newest point keeps its base.
        assert left == [made[2].time, made[3].time, made[4].time], root
    for m in made[2:]:
        restore(VmStore(settings.dir, name), m.time, tmp_path / f"r{m.time}.qcow2", None, False, quiet)
    # The 4th run deleted the first chain, so it flushed the points that stay first (the 5th deleted nothing).
    assert journal.read(VmStore(settings.dir, name).dir, durability.DURABLE) == {"through": made[3].time}


# The child kills itself (SIGKILL) 5 ms into backupBegin, which takes 40-90 ms here (libvirt validates the XML
# against its schemas first): libvirtd then finishes the begin alone.
_KILLED_IN_BEGIN = (
    "import os, signal, threading, time\n"
    "real_begin = libvirt.virDomain.backupBegin\n"
    "def begin(self, *args):\n"
    "    threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()\n"
    "    real_begin(self, *args)\n"
    "    time.sleep(60)\n"
    "libvirt.virDomain.backupBegin = begin\n")


def _backup_in_child(uri: str, name: str, settings: Settings, killed_in_begin: bool = False) -> subprocess.Popen[str]:
    code = (
        PRINT_STACKS_ON_SIGUSR1 +
        "import sys, libvirt; from pathlib import Path; import kvmconf.connection\n"
        "from kvmconf.backup.engine import Settings, backup_vm\n"
        + (_KILLED_IN_BEGIN if killed_in_begin else "") +
        f"dom = libvirt.open({uri!r}).lookupByName({name!r})\n"
        f"o = backup_vm(dom, Settings(Path({str(settings.dir)!r}), 5), 5)\n"
        "print(o.error)\n"
        "sys.exit(0 if o.ok else 1)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _copying(store: VmStore) -> bool:
    """The run is midway: its journal is written and it has copied some data into its partial point."""
    partials = store.partials()
    return bool(partials) and (store.dir / journal.JOURNAL).is_file() and any(
        f.stat().st_blocks * 512 > 8 * MIB for f in partials[0].glob("*.qcow2"))


def _wait_for(predicate: object, timeout: float = 300.0) -> None:  # generous: a shared, loaded machine
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sigkill_midway_then_recovery(the_lab: lab.Lab, conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 512), "qcow2")])
    expected = Expected(tmp_path / "expected.raw", 512)
    settings = Settings(backup_dir(tmp_path), full_every=5)
    store = VmStore(settings.dir, name)
    guest_write(dom, 0, 0x21, "0", "8M", expected)
    first = ok(backup_vm(dom, settings, 5, quiet)).manifest
    at_first = expected.snapshot(tmp_path / "at-first.raw")
    guest_write(dom, 0, 0x42, "64M", "400M", expected)  # enough that the next backup takes a while
    child = _backup_in_child(the_lab.uri, name, settings)
    _wait_for(lambda: _copying(store))
    child.send_signal(signal.SIGKILL)
    output, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL, output
    assert store.partials()  # it was killed midway: a partial point and a journal are left
    job_dir = Path(journal.read(store.dir)["job_dir"])  # type: ignore[index]
    assert (job_dir / "vm").read_text() == name  # what finds it should the journal be lost (test_backup_recovery)
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert any(n.startswith("removed the partial backup") for n in outcome.notes), outcome.notes
    assert not store.partials() and not (store.dir / journal.JOURNAL).exists()
    assert outcome.manifest is not None and outcome.manifest.kind == "incremental"
    assert dom.isActive()
    assert first is not None
    # The killed run's checkpoint is gone; the one it started from stays until the next run.
    assert {cp.getName() for cp in dom.listAllCheckpoints()} == {first.checkpoint, outcome.manifest.checkpoint}
    restore(store, first.time, tmp_path / "r1.raw", None, False, quiet)
    assert compare(tmp_path / "r1.raw", at_first).returncode == 0
    restore(store, outcome.manifest.time, tmp_path / "r2.raw", None, False, quiet)
    assert compare(tmp_path / "r2.raw", expected.path).returncode == 0


def _second_backup_in_child(the_lab: lab.Lab, conn: libvirt.virConnect, tmp_path: Path, name: str, disk_mb: int,
                            written_mb: int, killed_in_begin: bool = False
                            ) -> tuple[libvirt.virDomain, Settings, VmStore, Manifest, subprocess.Popen[str]]:
    """A VM with one backup, `written_mb` written since, and a second backup running in a child process."""
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", disk_mb), "qcow2")])
    settings = Settings(backup_dir(tmp_path), full_every=5)
    first = ok(backup_vm(dom, settings, 5, quiet)).manifest
    assert first is not None
    guest_write(dom, 0, 0x42, "0", f"{written_mb}M")
    return dom, settings, VmStore(settings.dir, name), first, _backup_in_child(the_lab.uri, name, settings,
                                                                               killed_in_begin)


def test_sigterm_midway_undoes_the_run_before_it_exits(the_lab: lab.Lab, conn: libvirt.virConnect, tmp_path: Path,
                                                       name: str) -> None:
    """cron's and systemd's timeouts send SIGTERM: the run cleans up itself instead of leaving it to the next."""
    dom, _, store, first, child = _second_backup_in_child(the_lab, conn, tmp_path, name, 512, 400)
    _wait_for(lambda: _copying(store))
    job_dir = Path(journal.read(store.dir)["job_dir"])  # type: ignore[index]
    child.send_signal(signal.SIGTERM)
    output = output_unless_hung(child, 300)
    assert child.returncode != 0, output
    assert "recovery: aborted the backup job" not in output  # it had ended its job itself
    assert not store.partials() and not (store.dir / journal.JOURNAL).exists() and not job_dir.exists()
    assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE and dom.isActive()
    assert [cp.getName() for cp in dom.listAllCheckpoints()] == [first.checkpoint]
    assert [m.time for m in store.points()] == [first.time]


def test_sigkill_while_the_job_starts_then_recovery(the_lab: lab.Lab, conn: libvirt.virConnect, tmp_path: Path,
                                                    name: str) -> None:
    """Killed inside backupBegin, libvirt finishes the begin alone: recovery waits for it, then undoes it.

    Recovering at once (deleting the new checkpoint while libvirt still set the job up) crashed
    libvirtd 9.0; the daemon must still answer afterwards.
    """
    dom, settings, store, first, child = _second_backup_in_child(the_lab, conn, tmp_path, name, 64, 8,
                                                                 killed_in_begin=True)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, output
    job_dir = Path(journal.read(store.dir)["job_dir"])  # type: ignore[index]
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert conn.getVersion() > 0 and dom.isActive()  # libvirtd survived the recovery
    assert "aborted the backup job of the interrupted run" in " ".join(outcome.notes), outcome.notes  # it had begun
    assert outcome.manifest is not None and outcome.manifest.kind == "incremental"
    assert {cp.getName() for cp in dom.listAllCheckpoints()} == {first.checkpoint, outcome.manifest.checkpoint}
    assert not job_dir.exists() and not store.partials()


def _qemu_pid(name: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and b"qemu-system" in cmdline[0] and f"guest={name},".encode() in b" ".join(cmdline):
                return int(entry.name)
    raise AssertionError(f"no QEMU process for {name}")


def test_qemu_killed_during_backup_next_is_full(the_lab: lab.Lab, conn: libvirt.virConnect, tmp_path: Path,
                                                name: str) -> None:
    dom, settings, store, first, child = _second_backup_in_child(the_lab, conn, tmp_path, name, 512, 400)
    _wait_for(lambda: _copying(store))
    os.kill(_qemu_pid(name), signal.SIGKILL)
    output = output_unless_hung(child, 600)
    # Killed midway the run fails, saying so; a copy quick enough to finish before the kill made its point.
    killed_midway = child.returncode != 0
    if killed_midway:
        assert "the VM stopped (or QEMU died) during the backup; the next backup will be a new full" in output, output
    _wait_for(lambda: not dom.isActive())
    dom.create()
    outcome = ok(backup_vm(dom, settings, 5, quiet))
    assert outcome.manifest is not None and outcome.manifest.kind == "full", (output, outcome)
    assert not store.partials()
    points = [m.time for m in store.points()]
    assert points[0] == first.time and len(points) == (2 if killed_midway else 3), (points, output)
    restore(store, first.time, tmp_path / "first.qcow2", None, False, quiet)  # verified against its checksums
    restore(store, None, tmp_path / "r.qcow2", None, False, quiet)
    # No guest writes since QEMU came back: the new full holds the disk as it is (-U: the VM holds its image).
    same = subprocess.run(["qemu-img", "compare", "-U", str(tmp_path / "r.qcow2"), str(tmp_path / "vda.qcow2")],
                          capture_output=True, text=True, check=False)
    assert same.returncode == 0, same.stdout + same.stderr


def test_full_target_gives_clear_error_and_no_corrupt_backup(small_fs: Path, conn: libvirt.virConnect,
                                                              tmp_path: Path, name: str) -> None:
    small = small_fs
    dom = define(conn, name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 64), "qcow2")])
    guest_write(dom, 0, 0x5A, "0", "40M")
    refused_for_space(dom, Settings(backup_dir(small), full_every=5))
    assert dom.listAllCheckpoints() == []  # the failed run's checkpoint is gone
    assert dom.isActive()


def refused_for_space(dom: libvirt.virDomain, settings: Settings) -> None:
    """The backup of `dom`'s 40 MiB of data is refused up front, as the files are sized before a byte is written,
    saying what it needs and has; nothing of it is left in the store."""
    outcome = backup_vm(dom, settings, 5, quiet)
    assert not outcome.ok
    assert f"the backup target {store_dir(settings, dom.name())} is too small for this backup: it needs 40 MiB," \
        in outcome.error, outcome.error
    assert "MiB are free: free space or move [backup] dir" in outcome.error
    store = VmStore(settings.dir, dom.name())
    assert store.points() == [] and store.partials() == []
    assert not (store.dir / journal.JOURNAL).exists()


def test_a_shut_off_vm_that_would_not_fit_is_refused_before_a_byte_is_written(
        small_fs: Path, conn: libvirt.virConnect, tmp_path: Path, name: str) -> None:
    """As a running VM's: qemu-img convert used to fill the backup disk first, then fail with its own words."""
    disk = make_disk(tmp_path / "vda.qcow2", "qcow2", 64)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 40M", str(disk)], check=True, capture_output=True)
    dom = define(conn, name, [(disk, "qcow2")], start=False)
    refused_for_space(dom, Settings(backup_dir(small_fs), full_every=5))
    assert not dom.isActive()


def test_a_shut_off_vms_progress_goes_to_stderr_as_a_running_ones_does(
        conn: libvirt.virConnect, tmp_path: Path, name: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Progress is shown when stderr is a terminal, and written there: qemu-img's own went to stdout, so
    `invoke backup --all | tee backup.log` or `> backup.log` filled the log with carriage-return lines."""
    disk = make_disk(tmp_path / "vda.qcow2", "qcow2", 16)
    dom = define(conn, name, [(disk, "qcow2")], start=False)
    settings = Settings(backup_dir(tmp_path), full_every=5, progress=True)
    capfd.readouterr()
    ok(backup_vm(dom, settings, 5, quiet))
    out, err = capfd.readouterr()
    assert "%)" not in out, out
    assert f"{name}: vda ({disk}):\n" in err and "(100.00/100%)" in err, err


def test_a_disk_that_is_not_backed_up_is_said_not_left_out_silently(conn: libvirt.virConnect, tmp_path: Path,
                                                                    name: str) -> None:
    """A storage pool's volume (as virt-manager attaches disks) is no file or block disk: the point leaves it out.
    The run said 'ok' and listed the other disks, so a restore was the first to find that disk missing."""
    (tmp_path / "pool").mkdir()
    pool = conn.storagePoolCreateXML(f"<pool type='dir'><name>{name}</name><target><path>{tmp_path / 'pool'}"
                                     "</path></target></pool>", 0)
    try:
        pool.createXML("<volume><name>data.qcow2</name><capacity unit='M'>16</capacity>"
                       "<target><format type='qcow2'/></target></volume>", 0)
        xml = bare_vm.domain_xml(name, [(make_disk(tmp_path / "vda.qcow2", "qcow2", 16), "qcow2")],
                                 bare_vm.halting_floppy(tmp_path / "halt.img"))
        dom = conn.defineXML(xml.replace("</devices>", "<disk type='volume' device='disk'><driver name='qemu'"
                                         f" type='qcow2'/><source pool='{name}' volume='data.qcow2'/>"
                                         "<target dev='vdb' bus='virtio'/></disk></devices>"))
        settings = Settings(backup_dir(tmp_path), full_every=5)
        said = ("vdb is NOT in this point: a disk of type 'volume' (only disks of type 'file' or 'block', with a"
                " source, are backed up): back it up another way, or attach it as its file or block device")
        offline = ok(backup_vm(dom, settings, 5, quiet)).manifest  # shut off
        dom.create()
        running = ok(backup_vm(dom, settings, 5, quiet)).manifest
        for point in (offline, running):
            assert point is not None and [d.dev for d in point.disks] == ["vda"]
            assert said in point.notes, point.notes
        dom.destroy()
    finally:
        pool.destroy()


def test_tasks_backup_restore_status_as_the_admin_runs_them(the_lab: lab.Lab, conn: libvirt.virConnect,
                                                            tmp_path: Path) -> None:
    """`invoke backup/restore/backup-status` on the lab: exit codes and messages, as cron and an admin see them."""
    site = (FIXTURES / "lab-site.toml").read_text().replace('dir = "/var/backups/kvmconf"',
                                                           f'dir = "{tmp_path}/b"\nnas_dir = "{tmp_path}/nas"')
    (tmp_path / "site.toml").write_text(site)
    env = {**os.environ, "KVMCONF_CLUSTER": str(FIXTURES / "lab-cluster.conf"),
           "KVMCONF_SITE": str(tmp_path / "site.toml"), "KVMCONF_LAB": str(the_lab.dir)}

    def invoke(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)

    dom = define(conn, "web", [(make_disk(tmp_path / "web.qcow2", "qcow2", 32), "qcow2")])
    guest_write(dom, 0, 0x5A, "0", "2M")
    with mount_tmpfs(the_lab.dir / "backups-nas", "64m"):  # the lab's NAS: a filesystem of its own, as a share
        result = invoke("backup", "--all")  # web only: db and cloud are not defined in this lab
        assert result.returncode == 0, result.stderr
        assert "web: full backup " in result.stdout and "db: not defined on kvm0: skipped" in result.stdout
        # In the lab directory, not the [backup] dir and nas_dir of site.toml: lab VMs may bear real VMs' names.
        assert [p.name for p in (the_lab.dir / "backups" / "web").iterdir() if p.name[0].isdigit()] != []
        assert not (tmp_path / "b").exists() and not (tmp_path / "nas").exists()
        # No agent channel: said, not hidden.
        assert "not frozen (crash-consistent): the VM has no guest agent channel" in result.stdout
        failed = invoke("backup", "--vm", "web", "--vm", "db")
        assert failed.returncode == 1
        assert "web: incremental backup " in failed.stdout and "db: BACKUP FAILED: not defined on kvm0" in failed.stdout
        assert failed.stderr.strip() == "kvmconf: backup failed for db"
        status = invoke("backup-status", "--vm", "web")
        assert status.returncode == 0 and "\nweb " in status.stdout, status.stdout
        line = status.stdout.splitlines()[1].split()
        assert (line[4], line[5], line[8]) == ("2", "2", "2"), line  # chain, points, NAS copies ([6:8]: size, unit)
        check = invoke("backup-status", "--nagios", "--vm", "web").stdout
        assert check.startswith("BACKUP OK - web ") and check.endswith(";;;0 web_chain=2;;;0\n"), check
        running = invoke("restore", "--vm", "web")
        assert running.returncode == 1 and "web: is running: shut it off first" in running.stderr
        (tmp_path / "out").mkdir()  # an existing directory receives <vm>-<disk>.<format>
        restored = invoke("restore", "--vm", "web", "--to", str(tmp_path / "out"))
        assert restored.returncode == 0, restored.stderr
        expected = Expected(tmp_path / "expected.raw", 32)
        expected.write(0x5A, "0", "2M")
        assert compare(tmp_path / "out" / "web-vda.qcow2", expected.path).returncode == 0
