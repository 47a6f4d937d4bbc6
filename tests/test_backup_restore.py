"""Restore with --to, from restore points written here (no libvirt): which point, where the images go, with which
mode, from a read-only backup disk or onto a target that cannot be written, and its progress.

Real qemu-img images, checksums and manifests as a backup writes them; read-only filesystems are real tmpfs
mounts (root), remounted read-only as a backup disk is for a recovery.
"""

from __future__ import annotations

import dataclasses
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from generators.model import Cluster
from kvmconf.backup.cluster import restore_vm
from kvmconf.backup.restore import RestoreFailed, pick, restore
from kvmconf.backup.store import DiskFile, Manifest, VmStore, checksum_file, write_point_files
from kvmconf.errors import KvmconfError
from tests.labs import quiet
from tests.test_backup import MIB, compare
from tests.tools import mount_tmpfs, require_tool

VM = "web"
TIMES = ("20261121T010000Z", "20261122T010000Z", "20261122T020000Z")


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


def backed_up(backups: Path, devs: tuple[str, ...] = ("vda",), times: tuple[str, ...] = TIMES[-1:],
              fmt: str = "qcow2") -> VmStore:
    """`VM`'s store under the [backup] dir `backups`: one full point per time, each disk 4 MiB with 1 MiB written."""
    store = VmStore(backups, VM)
    for time in times:
        point = store.point_dir(time)
        point.mkdir(parents=True)
        disks = []
        for n, dev in enumerate(devs):
            image = point / f"{dev}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x50 + n} 0 1M", str(image)], check=True,
                           capture_output=True)
            disks.append(DiskFile(dev, f"/var/lib/libvirt/images/{VM}-{dev}.{fmt}", fmt, image.name, 4 * MIB,
                                  image.stat().st_size, checksum_file(image), None))
        write_point_files(point, Manifest(VM, time, "full", time, None, None, False, [], disks, 1.0))
    return store


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path`, a mount point, read-only for the block, as a backup disk remounted for a recovery."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)


def as_backed_up(store: VmStore, image: Path, dev: str = "vda") -> bool:
    return compare(image, store.point_dir(store.points()[-1].time) / f"{dev}.qcow2").returncode == 0


def test_at_takes_a_whole_time_or_a_prefix_only_one_point_has(tmp_path: Path) -> None:
    store = backed_up(tmp_path, times=TIMES)
    assert pick(store, "20261121").time == TIMES[0]
    assert pick(store, TIMES[1]).time == TIMES[1]
    assert pick(store, None).time == TIMES[2]


@pytest.mark.parametrize("at", ["2026", "20261122", "20261122T0"])
def test_a_prefix_of_several_points_is_refused_with_them(tmp_path: Path, at: str) -> None:
    """The newest of them is not necessarily the one meant."""
    store = backed_up(tmp_path, times=TIMES)
    matching = ", ".join(t for t in TIMES if t.startswith(at))
    with pytest.raises(RestoreFailed) as failed:
        restore(store, at, tmp_path / "out.qcow2", None, False, quiet)
    assert str(failed.value) == (f"{VM}: --at {at} begins {matching.count(',') + 1} restore points ({matching}):"
                                 " give more of the time, up to the whole of it")
    assert not (tmp_path / "out.qcow2").exists()


@pytest.mark.parametrize("at", ["2026-11-22", "yesterday", "20261122T010000Z1", "20261122t01"])
def test_a_malformed_at_says_the_format_and_the_points(tmp_path: Path, at: str) -> None:
    store = backed_up(tmp_path, times=TIMES)
    with pytest.raises(RestoreFailed) as failed:
        pick(store, at)
    assert str(failed.value) == (f"{VM}: --at {at} is not a restore point's time: give the UTC time a point is named"
                                 " by, as 20261122T192456Z, or a beginning of it that only one point has (there are:"
                                 f" {', '.join(TIMES)})")


def test_an_at_no_point_begins_with_lists_the_points(tmp_path: Path) -> None:
    store = backed_up(tmp_path, times=TIMES)
    with pytest.raises(RestoreFailed) as failed:
        pick(store, "20261123")
    assert str(failed.value) == f"{VM}: no restore point 20261123 (there are: {', '.join(TIMES)})"


def test_an_existing_directory_receives_one_image_per_disk_even_named_like_a_file(tmp_path: Path) -> None:
    store = backed_up(tmp_path / "backups")
    out = tmp_path / "dir.d"
    out.mkdir()
    assert restore(store, None, out, None, False, quiet) == [out / f"{VM}-vda.qcow2"]
    assert as_backed_up(store, out / f"{VM}-vda.qcow2")


def test_a_new_path_is_the_image_of_a_one_disk_vm_whatever_its_name(tmp_path: Path) -> None:
    store = backed_up(tmp_path / "backups")
    assert restore(store, None, tmp_path / "restored", None, False, quiet) == [tmp_path / "restored"]
    assert (tmp_path / "restored").is_file() and as_backed_up(store, tmp_path / "restored")


@pytest.mark.parametrize("name", ["two.img", "two"])
def test_a_vm_with_several_disks_needs_an_existing_directory(tmp_path: Path, name: str) -> None:
    """Not a directory made under a name the admin meant for an image."""
    store = backed_up(tmp_path / "backups", devs=("vda", "vdb"))
    with pytest.raises(RestoreFailed) as failed:
        restore(store, None, tmp_path / name, None, False, quiet)
    assert str(failed.value) == (f"{VM}: has 2 disks (vda, vdb): --to must be an existing directory, which receives"
                                 f" one image per disk ({VM}-<disk>.<format>); {tmp_path / name} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups"]
    (tmp_path / name).mkdir()
    assert restore(store, None, tmp_path / name, None, False, quiet) == [tmp_path / name / f"{VM}-{dev}.qcow2"
                                                                         for dev in ("vda", "vdb")]


def test_a_mistyped_parent_directory_is_said_not_made(tmp_path: Path) -> None:
    store = backed_up(tmp_path / "backups")
    out = tmp_path / "restroed" / "web.qcow2"
    with pytest.raises(RestoreFailed) as failed:
        restore(store, None, out, None, False, quiet)
    assert str(failed.value) == (f"{VM}: --to {out}: {out.parent} is not a directory: --to is an existing directory,"
                                 " or a new file in one")
    assert not out.parent.exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restored_images_are_private_as_the_backups(tmp_path: Path, fmt: str) -> None:
    """qemu-img creates its output with the umask's mode (0644): a restored disk holds the VM's data."""
    store = backed_up(tmp_path / "backups", fmt=fmt)
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{VM}-vda.{fmt}.partial").write_bytes(b"an interrupted restore's")  # 0644: made anew, not kept
    [image] = restore(store, None, out, None, False, quiet)
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert compare(image, store.point_dir(TIMES[-1]) / "vda.qcow2").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [image.name]


def test_progress_shows_qemu_imgs_and_the_disk(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    store = backed_up(tmp_path / "backups")
    said: list[str] = []
    restore(store, None, tmp_path / "out.qcow2", None, False, said.append, progress=True)
    out, err = capfd.readouterr()
    # On stderr, as a backup's: `invoke restore ... > log` keeps the log free of progress lines.
    assert out == "" and err.startswith(f"{VM}: vda from {TIMES[-1]}:\n") and "(100.00/100%)" in err
    assert said == [f"{VM}: vda restored from {TIMES[-1]} to {tmp_path / 'out.qcow2'} (verified with qemu-img compare)"]
    restore(store, None, tmp_path / "quiet.qcow2", None, False, quiet, progress=False)
    assert capfd.readouterr() == ("", "")


def test_a_read_only_backup_disk_restores_with_to(tmp_path: Path) -> None:
    """It cannot take the lock, and needs none: no backup can delete a point there while the restore reads it."""
    with mount_tmpfs(tmp_path / "backups", "16m") as backups:
        store = backed_up(backups)
        with read_only(backups):
            [image] = restore(store, None, tmp_path / "out.qcow2", None, False, quiet)
            assert as_backed_up(store, image)
            with pytest.raises(RestoreFailed) as failed:
                restore(store, None, None, None, True, quiet)
        assert str(failed.value) == (f"{VM}: the backup store {store.dir} is read-only, and a restore in place records"
                                     " there which disks it swaps: restore with --to, or remount it read-write")


def test_a_lock_that_cannot_be_taken_on_a_writable_store_is_an_error(tmp_path: Path) -> None:
    store = backed_up(tmp_path / "backups")
    (store.dir / ".lock").mkdir()  # what open() cannot open for writing, even as root
    with pytest.raises(RestoreFailed) as failed:
        restore(store, None, tmp_path / "out.qcow2", None, False, quiet)
    assert str(failed.value) == (f"{VM}: cannot lock {store.dir / '.lock'} (Is a directory), which keeps backups from"
                                 " deleting the points a restore reads")
    assert not (tmp_path / "out.qcow2").exists()


@pytest.mark.parametrize("to", ["x.qcow2", "sub", "."])
def test_a_read_only_target_is_said_with_its_path_and_leaves_nothing(tmp_path: Path, to: str) -> None:
    store = backed_up(tmp_path / "backups")
    with mount_tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        target = ro / f"{VM}-vda.qcow2" if to == "." else ro / to
        with pytest.raises(RestoreFailed) as failed:
            restore(store, None, ro / to, None, False, quiet)
        assert str(failed.value) == (f"{VM}: cannot write the restored vda to {target}: {target}.partial: Read-only"
                                     " file system")
        assert list(ro.iterdir()) == []


def test_restore_from_the_nas_when_the_local_backup_disk_is_lost(example: Cluster, tmp_path: Path) -> None:
    """`restore --nas` reads the NAS copies (nas_dir, a filesystem of its own: a tmpfs here), also when the local
    [backup] dir is gone; the NAS not mounted is said, not restored from."""
    local, nas_mount = tmp_path / "local-disk", tmp_path / "nas"
    backup = dataclasses.replace(example.site.backup, dir=str(local), nas_dir=str(nas_mount))
    cluster = dataclasses.replace(example, site=dataclasses.replace(example.site, backup=backup))
    out = tmp_path / "web.qcow2"
    with pytest.raises(KvmconfError) as unmounted:
        restore_vm(cluster, VM, None, out, False, None, quiet, from_nas=True)  # type: ignore[arg-type]
    assert str(unmounted.value) == (f"nas_dir {nas_mount} does not exist: is the NAS share mounted? (kvmconf creates"
                                    " only the VM directories below it)")
    with mount_tmpfs(nas_mount, "16m") as nas:
        store = backed_up(nas)
        # No connection is needed to restore --to: `conns` is never used (None).
        assert restore_vm(cluster, VM, None, out, False, None, quiet, from_nas=True) == [out]  # type: ignore[arg-type]
        assert as_backed_up(store, out)
    assert not out.with_name(out.name + ".partial").exists() and not local.exists()


def test_restore_from_the_nas_needs_a_nas_dir(example: Cluster, tmp_path: Path) -> None:
    backup = dataclasses.replace(example.site.backup, dir=str(tmp_path), nas_dir=None)
    cluster = dataclasses.replace(example, site=dataclasses.replace(example.site, backup=backup))
    with pytest.raises(KvmconfError) as refused:
        restore_vm(cluster, VM, None, tmp_path / "x.qcow2", False, None, quiet, from_nas=True)  # type: ignore[arg-type]
    assert str(refused.value) == "--nas: site.toml's [backup] has no nas_dir: there are no NAS copies to restore from"


def test_in_place_is_refused_before_the_chain_is_read(tmp_path: Path) -> None:
    """Verifying reads every byte of the chain, minutes to hours: what refuses an in-place restore is said first
    (here the VM not defined; the point's damage shows which came first)."""
    store = backed_up(tmp_path / "backups")
    with (store.point_dir(TIMES[-1]) / "vda.qcow2").open("r+b") as f:
        f.write(b"X")
    with pytest.raises(RestoreFailed) as failed:
        restore(store, None, None, None, True, quiet)
    assert str(failed.value) == f"{VM}: not defined here: restore with --to PATH"


def test_a_damaged_point_is_said_with_the_points_it_takes_along_and_what_is_left(tmp_path: Path) -> None:
    """It said only the damage: which points are still to be restored is what the admin needs next."""
    from tests.test_backup_verify import FULL, INC1, INC2, chain

    store = chain(tmp_path / "backups")
    for time in (FULL, INC2):
        with (store.point_dir(time) / "vda.qcow2").open("r+b") as f:
            f.write(b"X")
    damaged = f"{store.point_dir(FULL) / 'vda.qcow2'}: checksum mismatch"
    with pytest.raises(RestoreFailed) as failed:
        restore(store, INC1, tmp_path / "out.qcow2", None, False, quiet)
    assert str(failed.value) == (f"vm: restore point {FULL} is damaged: {damaged}: it cannot be restored, nor the"
                                 f" points built on it ({INC1}, {INC2}); restore an earlier point or one of a later"
                                 " chain")
    (store.point_dir(FULL) / "vda.qcow2").write_bytes(b"full" * 1000)  # as it was written (test_backup_verify.chain)
    with pytest.raises(RestoreFailed) as failed:
        restore(store, None, tmp_path / "out.qcow2", None, False, quiet)
    assert str(failed.value) == (f"vm: restore point {INC2} is damaged: {store.point_dir(INC2) / 'vda.qcow2'}:"
                                 " checksum mismatch: it cannot be restored; restore an earlier point or one of a later"
                                 " chain")
    assert not (tmp_path / "out.qcow2").exists()


def test_a_backup_dir_that_is_not_there_is_said_not_taken_for_no_point(example: Cluster, tmp_path: Path) -> None:
    """Its disk not mounted, or lost: the backups may well exist. It said "no restore point", as if none had been
    made; backup-status tells the two apart."""
    disk = tmp_path / "backup-disk"
    backup = dataclasses.replace(example.site.backup, dir=str(disk / "kvmconf"), nas_dir=None)
    cluster = dataclasses.replace(example, site=dataclasses.replace(example.site, backup=backup))
    with pytest.raises(RestoreFailed) as failed:
        restore_vm(cluster, VM, None, tmp_path / "x.qcow2", False, None, quiet)  # type: ignore[arg-type]
    assert str(failed.value) == (f"{VM}: the [backup] dir {disk / 'kvmconf'} does not exist (is its filesystem"
                                 " mounted?): mount it, or restore from the NAS copies with --nas")
    assert not disk.exists()
    (disk / "kvmconf").mkdir(parents=True)
    with pytest.raises(RestoreFailed) as failed:
        restore_vm(cluster, VM, None, tmp_path / "x.qcow2", False, None, quiet)  # type: ignore[arg-type]
    assert str(failed.value) == f"{VM}: no restore point in {disk / 'kvmconf' / VM}"
