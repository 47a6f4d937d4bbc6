"""Points written without waiting for the disk: flushed before anything depends on them, checked after a reboot."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest

from kvmconf.backup import durability
from kvmconf.backup.store import DiskFile, Manifest, VmStore, write_point_files

OTHER_BOOT = "00000000-0000-0000-0000-000000000000"


def add_point(store: VmStore, time: str, chain: str, parent: str | None, content: bytes) -> Manifest:
    point = store.point_dir(time)
    point.mkdir(parents=True)
    (point / "vda.qcow2").write_bytes(content)
    m = Manifest("vm", time, "full" if parent is None else "incremental", chain, parent, None, False, [],
                 [DiskFile("vda", "/d/vm.qcow2", "qcow2", "vda.qcow2", 1 << 20, len(content),
                           blake3.blake3(content).hexdigest(), None)], 1.0)
    durability.record(store, time)
    write_point_files(point, m)
    return m


@pytest.fixture
def store(tmp_path: Path) -> VmStore:
    s = VmStore(tmp_path, "vm")
    add_point(s, "20260101T000000Z", "20260101T000000Z", None, b"full")
    add_point(s, "20260102T000000Z", "20260101T000000Z", "20260101T000000Z", b"inc1")
    add_point(s, "20260103T000000Z", "20260101T000000Z", "20260102T000000Z", b"inc2")
    return s


def times(store: VmStore) -> list[str]:
    return [m.time for m in store.points()]


def test_same_boot_points_stay_recorded_until_flushed(store: VmStore) -> None:
    marker = store.dir / durability.UNFLUSHED
    assert durability.settle(store, print, flush=False) == []
    assert marker.is_file()  # nothing depends on their being on disk yet: no flush paid
    assert durability.settle(store, print) == []
    assert not marker.exists() and len(times(store)) == 3


def test_after_a_reboot_a_lost_point_goes_with_the_points_built_on_it(store: VmStore,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (store.point_dir("20260102T000000Z") / "vda.qcow2").write_bytes(b"\0\0\0\0")  # what a crash can leave
    monkeypatch.setattr(durability, "boot_id", lambda: OTHER_BOOT)
    logged: list[str] = []
    notes = durability.settle(store, logged.append, flush=False)
    assert times(store) == ["20260101T000000Z"]  # the full verified; inc1 is lost and inc2 needs it
    assert notes == [f"restore point 20260102T000000Z did not reach the disk before the host went down"
                     f" ({store.dir}/20260102T000000Z/vda.qcow2: checksum mismatch): removed it and the 1 point(s)"
                     " built on it; the next backup starts a new chain"]
    assert logged == [f"vm: {notes[0]}"]
    assert not (store.dir / durability.UNFLUSHED).exists()


def test_after_a_reboot_intact_points_are_kept(store: VmStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durability, "boot_id", lambda: OTHER_BOOT)
    assert durability.settle(store, print, flush=False) == []
    assert len(times(store)) == 3 and not (store.dir / durability.UNFLUSHED).exists()


def test_a_new_boot_starts_a_new_record(store: VmStore, monkeypatch: pytest.MonkeyPatch) -> None:
    durability.settle(store, print)
    monkeypatch.setattr(durability, "boot_id", lambda: OTHER_BOOT)
    add_point(store, "20260104T000000Z", "20260104T000000Z", None, b"full2")
    from kvmconf.backup import journal

    assert journal.read(store.dir, durability.UNFLUSHED) == {"boot_id": OTHER_BOOT, "points": ["20260104T000000Z"]}
