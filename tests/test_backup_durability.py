"""Points written without waiting for the disk: flushed before anything depends on them, checked after a reboot."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmconf.backup import durability, journal
from kvmconf.backup.store import DiskFile, Manifest, VmStore, checksum_file, write_point_files

OTHER_BOOT = "00000000-0000-0000-0000-000000000000"


def add_point(store: VmStore, time: str, chain: str, parent: str | None, content: bytes,
              boot: str | None = None) -> Manifest:
    point = store.point_dir(time)
    point.mkdir(parents=True)
    (point / "vda.qcow2").write_bytes(content)
    m = Manifest("vm", time, "full" if parent is None else "incremental", chain, parent, None, False, [],
                 [DiskFile("vda", "/d/vm.qcow2", "qcow2", "vda.qcow2", 1 << 20, len(content),
                           checksum_file(point / "vda.qcow2"), None)], 1.0,
                 boot_id=durability.boot_id() if boot is None else boot)
    write_point_files(point, m)
    return m


def add_chain(store: VmStore, boot: str | None = None) -> None:
    add_point(store, "20260101T000000Z", "20260101T000000Z", None, b"full", boot)
    add_point(store, "20260102T000000Z", "20260101T000000Z", "20260101T000000Z", b"inc1", boot)
    add_point(store, "20260103T000000Z", "20260101T000000Z", "20260102T000000Z", b"inc2", boot)


def times(store: VmStore) -> list[str]:
    return [m.time for m in store.points()]


def through(store: VmStore) -> str | None:
    mark = journal.read(store.dir, durability.DURABLE)
    return None if mark is None else str(mark["through"])


def test_points_of_this_boot_are_flushed_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VmStore(tmp_path, "vm")
    add_chain(store)
    flushed: list[str] = []
    monkeypatch.setattr(durability, "fsync_path", lambda path: flushed.append(str(path.relative_to(store.dir))))
    assert durability.settle(store, print, flush=False) == []
    assert through(store) is None and flushed == []  # nothing depends on their being on disk yet: no flush paid
    assert durability.settle(store, print) == []
    points = ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"]
    assert flushed == [f"{p}/vda.qcow2" for p in points]
    assert through(store) == "20260103T000000Z" and len(times(store)) == 3
    add_point(store, "20260104T000000Z", "20260104T000000Z", None, b"full2")
    flushed.clear()
    durability.settle(store, print)
    assert flushed == ["20260104T000000Z/vda.qcow2"]  # only what is new
    assert through(store) == "20260104T000000Z"


def test_after_a_reboot_a_lost_point_goes_with_the_points_built_on_it(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "vm")
    add_chain(store, OTHER_BOOT)
    (store.point_dir("20260102T000000Z") / "vda.qcow2").write_bytes(b"\0\0\0\0")  # what a crash can leave
    logged: list[str] = []
    notes = durability.settle(store, logged.append, flush=False)
    assert times(store) == ["20260101T000000Z"]  # the full verified; inc1 is lost and inc2 needs it
    assert notes == [f"restore point 20260102T000000Z did not reach the disk before the host went down"
                     f" ({store.dir}/20260102T000000Z/vda.qcow2: checksum mismatch): removed it and the 1 point(s)"
                     " built on it; the next backup starts a new chain"]
    assert logged == [f"vm: {notes[0]}"]
    assert through(store) == "20260101T000000Z"  # it survived the reboot: on disk, never checked again


def test_after_a_reboot_intact_points_are_kept_and_checked_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = VmStore(tmp_path, "vm")
    add_chain(store, OTHER_BOOT)
    assert durability.settle(store, print, flush=False) == []
    assert len(times(store)) == 3 and through(store) == "20260103T000000Z"
    checked: list[str] = []
    monkeypatch.setattr(VmStore, "verify", lambda self, m: checked.append(m.time) or [])
    durability.settle(store, print, flush=False)
    assert checked == []


def test_points_already_on_disk_are_not_checked_after_a_reboot(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = VmStore(tmp_path, "vm")
    add_chain(store)
    durability.settle(store, print)  # flushed in their boot
    monkeypatch.setattr(durability, "boot_id", lambda: OTHER_BOOT)
    (store.point_dir("20260102T000000Z") / "vda.qcow2").write_bytes(b"rot!")  # not durability's business
    assert durability.settle(store, print, flush=False) == [] and len(times(store)) == 3


def test_a_mark_that_does_not_parse_is_replaced_after_every_point_is_settled_again(tmp_path: Path) -> None:
    """An empty durable.json (a power cut after its rename, not flushed) used to fail every run of the VM."""
    store = VmStore(tmp_path, "vm")
    add_chain(store, OTHER_BOOT)
    (store.point_dir("20260103T000000Z") / "vda.qcow2").write_bytes(b"lost")  # checked again, so found
    (store.dir / durability.DURABLE).write_text("")
    logged: list[str] = []
    notes = durability.settle(store, logged.append, flush=False)
    assert notes[0] == (f"{store.dir / durability.DURABLE} does not parse (Expecting value: line 1 column 1 (char 0)):"
                        " every point is settled again")
    assert notes[1].startswith("restore point 20260103T000000Z did not reach the disk") and len(notes) == 2
    assert logged == [f"vm: {note}" for note in notes]
    assert times(store) == ["20260101T000000Z", "20260102T000000Z"] and through(store) == "20260102T000000Z"
