"""An in-place restore of a two-disk VM that fails or is cut short: no disk is lost or left half-swapped.

The lab, VMs and helpers are test_backup's, with this module's own libvirtd under them. The swap
tests' one mock is Path.rename, for the chosen calls only: no filesystem here fails the second disk's rename on
demand while the first disk's succeeded (ENOSPC on a rename needs a directory that must grow on a
full filesystem at that very moment), and no signal from outside lands between two renames
microseconds apart. The restore, its files, the backup it restores and the libvirt domain are real.
The last tests each fake one failure no real thing gives here on demand, and say which.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from kvmconf import lab
from kvmconf.backup import journal
from kvmconf.backup import restore as restore_module
from kvmconf.backup.engine import Settings, backup_vm
from kvmconf.backup.restore import RestoreFailed, restore
from kvmconf.backup.store import Manifest, VmStore
from tests import test_backup
from tests.labs import quiet, running_lab
from tests.test_backup import MIB, compare, define, make_disk, ok
from tests.tools import PRINT_STACKS_ON_SIGUSR1, ROOT, output_unless_hung

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-rstest-"  # + the pytest PID: a killed run's namespaces are removed by the next run

# test_backup's per-test fixtures, with this module's own lab under them.
conn = test_backup.conn
name = test_backup.name
small_fs = test_backup.small_fs


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)


def write_pattern(disk: Path, fmt: str, pattern: int, offset: str, length: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", str(disk)], check=True,
                   capture_output=True)


class TwoDiskVm:
    """A shut-off VM with a qcow2 and a raw disk, one offline backup, and both disks written since.

    `vda_data_mb` in the backup's vda: the more, the longer a restore takes to rebuild it.
    """

    def __init__(self, conn: libvirt.virConnect, tmp_path: Path, name: str, vda_mb: int = 32,
                 vda_data_mb: int = 2) -> None:
        self.dir = tmp_path / "disks"
        self.dir.mkdir()
        self.vda = make_disk(self.dir / "vda.qcow2", "qcow2", vda_mb)
        self.vdb = make_disk(self.dir / "vdb.raw", "raw", 16)
        write_pattern(self.vda, "qcow2", 0x11, "1M", f"{vda_data_mb}M")
        write_pattern(self.vdb, "raw", 0x22, "0", "3M")
        self.dom = define(conn, name, [(self.vda, "qcow2"), (self.vdb, "raw")], start=False)
        (tmp_path / "backups").mkdir()  # the [backup] dir, as `fab kvm-setup` makes it
        self.store = VmStore(tmp_path / "backups", name)
        point = ok(backup_vm(self.dom, Settings(self.store.dir.parent, full_every=3), 3, quiet)).manifest
        assert point is not None and point.kind == "offline"
        self.point: Manifest = point
        write_pattern(self.vda, "qcow2", 0x99, "0", "8M")  # what the restore would replace
        write_pattern(self.vdb, "raw", 0x98, "2M", "4M")
        # The disks as they are now, to compare with: copies elsewhere, and which file (inode) each path is.
        self.copies = {disk: Path(shutil.copy(disk, tmp_path / f"before-{disk.name}")) for disk in (self.vda, self.vdb)}
        self.inodes = {disk: disk.stat().st_ino for disk in (self.vda, self.vdb)}
        self.listing = sorted(p.name for p in self.dir.iterdir())

    def backed_up(self, disk: Path) -> Path:
        return self.store.point_dir(self.point.time) / f"{disk.name.split('.')[0]}.qcow2"

    def assert_as_before(self) -> None:
        """The same files at the same paths with the same content, and nothing else beside them."""
        for disk, copy in self.copies.items():
            assert disk.stat().st_ino == self.inodes[disk], f"{disk} is not the VM's own file any more"
            result = compare(disk, copy)
            assert result.returncode == 0, (disk, result.stdout)
        assert sorted(p.name for p in self.dir.iterdir()) == self.listing  # no staged, partial or kept file


def fail_rename(monkeypatch: pytest.MonkeyPatch, src: Path, dst: Path, err: BaseException, after: bool = False) -> None:
    """Path.rename raises `err` for src -> dst only, instead of renaming or, `after`, once it has renamed (a Ctrl-C
    landing just after the call returned); every other rename (the roll-back's too) is the real one."""
    real = Path.rename

    def rename(self: Path, target: str | Path) -> Path:
        if (self, Path(target)) != (src, dst):
            return real(self, target)
        if after:
            real(self, target)
        raise err

    monkeypatch.setattr(Path, "rename", rename)


# The second disk's two renames: its own image to the kept name, then the restored image into its place.
SECOND_DISK_STEPS = {
    "keeping vdb": lambda vm: (vm.vdb, vm.dir / f"vdb.raw.before-restore-{vm.point.time}"),
    "putting the restored vdb in place": lambda vm: (vm.dir / "vdb.raw.restored", vm.vdb),
}


@pytest.mark.parametrize("step", SECOND_DISK_STEPS)
def test_swap_failing_on_the_second_disk_puts_every_disk_back(conn: libvirt.virConnect, tmp_path: Path, name: str,
                                                              monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    vm = TwoDiskVm(conn, tmp_path, name)
    src, dst = SECOND_DISK_STEPS[step](vm)
    fail_rename(monkeypatch, src, dst, OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst)))
    # A user's error (no traceback) that says which disk, which rename and why, and that nothing was replaced.
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, None, vm.dom, True, quiet)
    assert str(failed.value) == (f"{name}: swapping the restored vdb in failed ([Errno 28] No space left on device:"
                                 f" '{src}' -> '{dst}'); every disk is back as it was: nothing was replaced")
    vm.assert_as_before()
    # Nothing is recorded as kept: the next backup of the running VM has nothing of this restore to remove.
    assert journal.read(vm.store.dir, journal.REPLACED) is None
    assert [m.time for m in vm.store.points()] == [vm.point.time] and not vm.store.partials()

    monkeypatch.undo()
    assert restore(vm.store, None, None, vm.dom, True, quiet) == [vm.vda, vm.vdb]  # a later restore works
    kept = {disk: disk.with_name(f"{disk.name}.before-restore-{vm.point.time}") for disk in (vm.vda, vm.vdb)}
    for disk in (vm.vda, vm.vdb):
        assert compare(disk, vm.backed_up(disk)).returncode == 0
        assert kept[disk].stat().st_ino == vm.inodes[disk] and compare(kept[disk], vm.copies[disk]).returncode == 0
    assert journal.read(vm.store.dir, journal.REPLACED) == {"files": [str(kept[vm.vda]), str(kept[vm.vdb])]}
    assert sorted(p.name for p in vm.dir.iterdir()) == sorted([*vm.listing, *(k.name for k in kept.values())])


@pytest.mark.parametrize("step", SECOND_DISK_STEPS)
def test_ctrl_c_just_after_a_rename_of_the_second_disk_puts_every_disk_back(
        conn: libvirt.virConnect, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """The roll-back goes by the files, not by a list of the renames done: the interrupt lands before the list
    could say that vdb was moved to its kept name, which no record would name once the restore gave up."""
    vm = TwoDiskVm(conn, tmp_path, name)
    src, dst = SECOND_DISK_STEPS[step](vm)
    fail_rename(monkeypatch, src, dst, KeyboardInterrupt(), after=True)
    with pytest.raises(KeyboardInterrupt):
        restore(vm.store, None, None, vm.dom, True, quiet)
    vm.assert_as_before()
    assert journal.read(vm.store.dir, journal.REPLACED) is None


def test_a_failed_swap_whose_roll_back_fails_too_is_put_back_by_the_next_restore(
        conn: libvirt.virConnect, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two injected failures (see the module's docstring): vdb's restored image does not get to its place, then
    vdb's own image does not get back. Nothing recorded is lost, the message says where to look, and the next
    restore in place puts the disks back before it swaps again."""
    vm = TwoDiskVm(conn, tmp_path, name)
    kept_vdb = vm.dir / f"vdb.raw.before-restore-{vm.point.time}"
    put, undo = (vm.dir / "vdb.raw.restored", vm.vdb), (kept_vdb, vm.vdb)
    fail_rename(monkeypatch, *put, OSError(errno.ENOSPC, "No space left on device", str(put[0]), None, str(put[1])))
    fail_rename(monkeypatch, *undo, OSError(errno.EIO, "Input/output error", str(undo[0]), None, str(undo[1])))
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, None, vm.dom, True, quiet)
    assert str(failed.value) == (
        f"{name}: swapping the restored vdb in failed ([Errno 28] No space left on device: '{put[0]}' -> '{put[1]}'),"
        f" and putting the disks back failed too ([Errno 5] Input/output error: '{undo[0]}' -> '{undo[1]}');"
        f" {vm.store.dir / journal.REPLACED} records where each disk is: the next restore in place puts them back,"
        " and backups keep the replaced ones until then")
    assert kept_vdb.stat().st_ino == vm.inodes[vm.vdb] and not vm.vdb.exists()  # vdb's own image: where it says
    assert journal.SWAPPING in journal.read(vm.store.dir, journal.REPLACED)  # type: ignore[operator]

    monkeypatch.undo()
    lines: list[str] = []
    assert restore(vm.store, None, None, vm.dom, True, lines.append) == [vm.vda, vm.vdb]
    assert lines[0] == (f"{name}: an earlier in-place restore did not finish swapping the disks: put {vm.vda},"
                        f" {vm.vdb} back as they were before it")
    kept = [disk.with_name(f"{disk.name}.before-restore-{vm.point.time}") for disk in (vm.vda, vm.vdb)]
    for disk, keep in zip((vm.vda, vm.vdb), kept, strict=True):
        assert compare(disk, vm.backed_up(disk)).returncode == 0
        assert keep.stat().st_ino == vm.inodes[disk] and compare(keep, vm.copies[disk]).returncode == 0
    assert journal.read(vm.store.dir, journal.REPLACED) == {"files": list(map(str, kept))}


def _processes_naming(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return pids


def _restore_in_place_in_child(uri: str, vm: TwoDiskVm) -> subprocess.Popen[str]:
    code = (
        PRINT_STACKS_ON_SIGUSR1 +
        "import libvirt; from pathlib import Path; import kvmconf.connection\n"
        "from kvmconf.backup.restore import restore\n"
        "from kvmconf.backup.store import VmStore\n"
        f"dom = libvirt.open({uri!r}).lookupByName({vm.dom.name()!r})\n"
        f"restore(VmStore(Path({str(vm.store.dir.parent)!r}), {vm.dom.name()!r}), None, None, dom, True)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_sigterm_while_the_images_are_rebuilt_leaves_nothing_of_the_restore(the_lab: lab.Lab, conn: libvirt.virConnect,
                                                                             tmp_path: Path, name: str) -> None:
    """cron's and systemd's timeouts and an admin's `kill` send SIGTERM: the half-written images go, not only on
    Ctrl-C. (Python's default for SIGTERM ends the process at once, and qemu-img went on writing alone.)"""
    vm = TwoDiskVm(conn, tmp_path, name, vda_mb=512, vda_data_mb=400)  # the rebuild takes a while
    child = _restore_in_place_in_child(the_lab.uri, vm)
    partial = vm.dir / "vda.qcow2.restored.partial"
    deadline = time.monotonic() + 300  # generous: a shared, loaded machine
    while not (partial.is_file() and partial.stat().st_blocks * 512 > 8 * MIB):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    output = output_unless_hung(child, 300)
    assert child.returncode != 0, output
    assert not _processes_naming(partial), "a qemu-img writing the staged image outlived the restore"
    vm.assert_as_before()
    assert journal.read(vm.store.dir, journal.REPLACED) is None


def test_a_restore_to_a_full_filesystem_says_so_and_leaves_no_partial_image(conn: libvirt.virConnect, tmp_path: Path,
                                                                             name: str, small_fs: Path) -> None:
    vm = TwoDiskVm(conn, tmp_path, name, vda_data_mb=20)  # more than the 12 MiB filesystem holds
    out = small_fs / name
    out.mkdir()
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, out, None, False, quiet)
    partial = out / f"{name}-vda.qcow2.partial"
    assert str(failed.value).startswith("qemu-img convert -f qcow2 -O qcow2 ") and f" {partial}: " in str(failed.value)
    assert "No space left on device" in str(failed.value), failed.value
    assert list(out.iterdir()) == []  # the space is free again


def test_in_place_refuses_a_vm_whose_disk_is_not_where_the_backup_found_it(conn: libvirt.virConnect, tmp_path: Path,
                                                                            name: str) -> None:
    """In place swaps the paths the restore point recorded. A disk moved since (a copy to other storage, a
    migration) leaves its old file behind: that file was replaced and the VM started on its unrestored disk."""
    vm = TwoDiskVm(conn, tmp_path, name)
    other_storage = tmp_path / "other-storage"
    other_storage.mkdir()
    now_vdb = Path(shutil.copy(vm.vdb, other_storage / "vdb.raw"))
    vm.dom.undefine()
    dom = define(conn, name, [(vm.vda, "qcow2"), (now_vdb, "raw")], start=False)
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, None, dom, True, quiet)
    assert str(failed.value) == (f"{name}: vdb was {vm.vdb} (raw) in the restore point {vm.point.time}, the VM has"
                                 f" {now_vdb} (raw) now: restore with --to and put the image in place by hand")
    vm.assert_as_before()
    assert compare(now_vdb, vm.copies[vm.vdb]).returncode == 0
    assert journal.read(vm.store.dir, journal.REPLACED) is None


def _restore_killed_at_rename_in_child(uri: str, vm: TwoDiskVm, renamed: Path) -> subprocess.CompletedProcess[str]:
    """A real restore in place whose process is SIGKILLed as it is about to rename `renamed`.

    The one mock, as in the tests above: a kill -9 or a power cut in the microseconds between two
    renames cannot be timed from outside.
    """
    code = (
        "import os, signal, libvirt; from pathlib import Path; import kvmconf.connection\n"
        "from kvmconf.backup.restore import restore\n"
        "from kvmconf.backup.store import VmStore\n"
        "real = Path.rename\n"
        "def rename(self, target):\n"
        f"    if self == Path({str(renamed)!r}):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, target)\n"
        "Path.rename = rename\n"
        f"dom = libvirt.open({uri!r}).lookupByName({vm.dom.name()!r})\n"
        f"restore(VmStore(Path({str(vm.store.dir.parent)!r}), {vm.dom.name()!r}), None, None, dom, True)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_restore_killed_between_two_disks_loses_no_disk(the_lab: lab.Lab, conn: libvirt.virConnect, tmp_path: Path,
                                                          name: str) -> None:
    """Killed after vda was swapped and before vdb was, the VM starts on restored vda and old vdb. The next backup
    of the running VM removed the replaced disks, vda's own copy among them: it now keeps them and says why,
    and the next restore in place puts the killed swap back before it swaps again."""
    vm = TwoDiskVm(conn, tmp_path, name)
    killed = _restore_killed_at_rename_in_child(the_lab.uri, vm, vm.vdb)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    kept_vda = vm.dir / f"vda.qcow2.before-restore-{vm.point.time}"
    assert compare(vm.vda, vm.backed_up(vm.vda)).returncode == 0 and kept_vda.stat().st_ino == vm.inodes[vm.vda]
    vm.dom.create()
    lines: list[str] = []
    ok(backup_vm(vm.dom, Settings(vm.store.dir.parent, full_every=3), 3, lines.append))
    assert kept_vda.stat().st_ino == vm.inodes[vm.vda]  # vda's disk as it was before the restore is still there
    assert (f"{name}: an in-place restore did not finish swapping the disks: the replaced ones are kept"
            f" ({kept_vda}, {kept_vda.with_name(f'vdb.raw.before-restore-{vm.point.time}')}); shut the VM off and"
            " restore again, which puts them back first") in lines, lines
    vm.dom.destroy()
    lines.clear()
    assert restore(vm.store, vm.point.time, None, vm.dom, True, lines.append) == [vm.vda, vm.vdb]
    assert lines[0] == (f"{name}: an earlier in-place restore did not finish swapping the disks: put {vm.vda},"
                        f" {vm.vdb} back as they were before it")
    for disk in (vm.vda, vm.vdb):
        assert compare(disk, vm.backed_up(disk)).returncode == 0
    # The disks as they were before the killed restore are the ones kept now, and only they are recorded.
    kept = [disk.with_name(f"{disk.name}.before-restore-{vm.point.time}") for disk in (vm.vda, vm.vdb)]
    for disk, keep in zip((vm.vda, vm.vdb), kept, strict=True):
        assert keep.stat().st_ino == vm.inodes[disk] and compare(keep, vm.copies[disk]).returncode == 0
    assert journal.read(vm.store.dir, journal.REPLACED) == {"files": list(map(str, kept))}
    assert sorted(p.name for p in vm.dir.iterdir()) == sorted([*vm.listing, *(k.name for k in kept)])


def test_restored_images_are_flushed_before_they_take_a_name(conn: libvirt.virConnect, tmp_path: Path, name: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img convert leaves its output unflushed: each image is on disk before it becomes a target or a disk,
    and the swap's renames are on disk before the record says the swap is whole. (fsync is recorded, then done.)"""
    vm = TwoDiskVm(conn, tmp_path, name)
    events: list[str] = []
    real_fsync, real_write = restore_module.fsync_path, journal.write

    def fsync_path(path: Path) -> None:
        events.append(f"fsync {path.name}")
        real_fsync(path)

    def write(directory: Path, entry: dict[str, object], name: str = journal.JOURNAL, durable: bool = True) -> None:
        events.append(f"record {sorted(entry)}")
        real_write(directory, entry, name, durable)

    monkeypatch.setattr(restore_module, "fsync_path", fsync_path)
    monkeypatch.setattr(journal, "write", write)
    restore(vm.store, None, None, vm.dom, True, quiet)
    assert events == ["fsync vda.qcow2.restored.partial", "fsync disks", "fsync vdb.raw.restored.partial",
                      "fsync disks", f"record {sorted(['files', journal.SWAPPING])}", "fsync disks",
                      "record ['files']"]


def test_a_target_that_cannot_be_linked_keeps_the_verified_image_and_says_where(
        conn: libvirt.virConnect, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one mock: os.link failing as on a filesystem without hard links (none can be made here)."""
    vm = TwoDiskVm(conn, tmp_path, name)
    out = tmp_path / "out"
    out.mkdir()

    def no_links(src: Path, dst: Path) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(restore_module.os, "link", no_links)
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, out, None, False, quiet)
    partial = out / f"{name}-vda.qcow2.partial"
    assert str(failed.value) == (f"{name}: cannot give the restored vda its name {out / f'{name}-vda.qcow2'} ([Errno 1]"
                                 f" Operation not permitted); it is complete and verified as {partial}: rename it"
                                 " by hand")
    assert compare(vm.backed_up(vm.vda), partial).returncode == 0


def test_checkpoints_that_cannot_be_dropped_leave_the_restore_done_and_said(
        conn: libvirt.virConnect, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one mock: a checkpoint whose metadata delete fails (libvirt cannot be made to fail it on demand)."""
    vm = TwoDiskVm(conn, tmp_path, name)

    class Stuck:
        def delete(self, flags: int) -> None:
            raise libvirt.libvirtError("checkpoint metadata is locked")

    monkeypatch.setattr(restore_module, "our_checkpoints", lambda dom: [Stuck()])
    said: list[str] = []
    assert restore(vm.store, None, None, vm.dom, True, said.append) == [vm.vda, vm.vdb]
    assert said[-2].startswith(f"{name}: the replaced disks are kept (")
    assert said[-1].startswith(f"{name}: restored, but its checkpoints could not be dropped (") and said[-1].endswith(
        "): the next backup finds their bitmaps missing and makes a new full")
    for disk in (vm.vda, vm.vdb):
        assert compare(disk, vm.backed_up(disk)).returncode == 0


def test_a_point_pruned_while_the_restore_waited_for_the_lock_is_not_taken_for_damaged(
        conn: libvirt.virConnect, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point is chosen under the lock: a backup that pruned it just before is not reported as damage.
    (The one fake: the backup's pruning is done right before the restore takes the lock.)"""
    vm = TwoDiskVm(conn, tmp_path, name)
    real_lock = journal.vm_lock

    def lock_after_a_prune(vm_dir: Path) -> contextlib.AbstractContextManager[None]:
        vm.store.remove_point(vm.point.time)
        return real_lock(vm_dir)

    monkeypatch.setattr(journal, "vm_lock", lock_after_a_prune)
    (tmp_path / "out").mkdir()
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, tmp_path / "out", None, False, quiet)
    assert str(failed.value) == f"{name}: no restore point in {vm.store.dir}"
    assert list((tmp_path / "out").iterdir()) == []


def test_in_place_keeps_each_disks_mode_and_says_the_disks_not_the_staged_images(conn: libvirt.virConnect,
                                                                               tmp_path: Path, name: str) -> None:
    """qemu-img would create the restored images 0644 whatever the disks were; the log names the VM's disks."""
    vm = TwoDiskVm(conn, tmp_path, name)
    vm.vda.chmod(0o640)
    vm.vdb.chmod(0o600)
    lines: list[str] = []
    assert restore(vm.store, None, None, vm.dom, True, lines.append) == [vm.vda, vm.vdb]
    assert [stat.S_IMODE(disk.stat().st_mode) for disk in (vm.vda, vm.vdb)] == [0o640, 0o600]
    t = vm.point.time
    assert lines[:3] == [f"{name}: vda of {vm.vda} rebuilt from {t} (verified with qemu-img compare)",
                         f"{name}: vdb of {vm.vdb} rebuilt from {t} (verified with qemu-img compare)",
                         f"{name}: restored from {t} in place: {vm.vda}, {vm.vdb}"]
    for disk in (vm.vda, vm.vdb):
        assert compare(disk, vm.backed_up(disk)).returncode == 0


def test_in_place_without_force_is_refused_before_the_chain_is_read(conn: libvirt.virConnect, tmp_path: Path,
                                                                   name: str) -> None:
    """It used to read every byte of the chain first (minutes to hours) to say then that --force was missing. The
    point's damage shows which came first."""
    vm = TwoDiskVm(conn, tmp_path, name)
    with vm.backed_up(vm.vda).open("r+b") as f:
        f.write(b"X")
    with pytest.raises(RestoreFailed) as failed:
        restore(vm.store, None, None, vm.dom, False, quiet)
    assert str(failed.value) == f"{name}: restoring in place replaces its disks: confirm with --force"
    vm.assert_as_before()
