"""backup-verify reads every point back, and the next backup does not extend a chain it found damaged or that is
missing a point: real files and checksums, the engine's own decision (no VM needed to decide)."""

from __future__ import annotations

from pathlib import Path

from kvmconf.backup import journal, verify
from kvmconf.backup.engine import Settings, _decide_incremental
from kvmconf.backup.libvirt_xml import VmDisk
from kvmconf.backup.store import DiskFile, Manifest, VmStore, checksum_file, write_point_files

FULL, INC1, INC2 = "20260101T000000Z", "20260102T000000Z", "20260103T000000Z"
DISKS = [VmDisk("vda", "/d/vm.qcow2", "qcow2")]
NOW = "20260104T000000Z"


def add_point(store: VmStore, time: str, parent: str | None, content: bytes) -> Manifest:
    point = store.point_dir(time)
    point.mkdir(parents=True)
    (point / "vda.qcow2").write_bytes(content)
    m = Manifest("vm", time, "full" if parent is None else "incremental", FULL, parent, f"kvmconf-{time}", True, [],
                 [DiskFile("vda", "/d/vm.qcow2", "qcow2", "vda.qcow2", 1 << 20, len(content),
                           checksum_file(point / "vda.qcow2"), None if parent is None else f"../{parent}/vda.qcow2")],
                 1.0)
    write_point_files(point, m)
    return m


def chain(tmp_path: Path) -> VmStore:
    store = VmStore(tmp_path, "vm")
    add_point(store, FULL, None, b"full" * 1000)
    add_point(store, INC1, FULL, b"inc1")
    add_point(store, INC2, INC1, b"inc2")
    return store


def decide(store: VmStore) -> tuple[str | None, str]:
    """What the next backup builds on (None: a new full) and why; every checkpoint is still in libvirt."""
    points = store.points()
    parent, why = _decide_incremental([m.checkpoint for m in points if m.checkpoint], DISKS, points,
                                      Settings(store.dir.parent, full_every=5), store)
    return (None if parent is None else parent.time), why


def test_an_intact_store_verifies_and_the_next_backup_extends_its_chain(tmp_path: Path) -> None:
    store = chain(tmp_path)
    logged: list[str] = []
    assert verify.verify(store, NOW, logged.append) == {}
    assert logged == [f"vm: {FULL}: ok (0.0 MiB)", f"vm: {INC1}: ok (0.0 MiB)", f"vm: {INC2}: ok (0.0 MiB)"]
    assert not (store.dir / verify.DAMAGED).exists()
    assert decide(store) == (INC2, "")


def test_a_damaged_point_is_reported_recorded_and_not_built_on(tmp_path: Path) -> None:
    store = chain(tmp_path)
    with (store.point_dir(FULL) / "vda.qcow2").open("r+b") as f:  # one byte rotted on the backup disk
        f.seek(100)
        f.write(b"X")
    logged: list[str] = []
    damaged = verify.verify(store, NOW, logged.append)
    problem = f"{store.point_dir(FULL) / 'vda.qcow2'}: checksum mismatch"
    assert damaged == {FULL: [problem]}
    assert logged == [f"vm: {FULL}: DAMAGED: {problem}", f"vm: {INC1}: ok (0.0 MiB)", f"vm: {INC2}: ok (0.0 MiB)",
                      f"vm: the points built on {FULL} cannot be restored either: {INC1}, {INC2}"]
    assert journal.read(store.dir, verify.DAMAGED) == {"time": NOW, "points": {FULL: [problem]}}
    assert decide(store) == (None, f"backup-verify found damaged points in the last point's chain ({FULL})")
    # Once the damaged chain is gone (retention), the record no longer names anything that is there.
    for time in (INC2, INC1, FULL):
        store.remove_point(time)
    assert verify.damaged_points(store) == {}


def test_a_verify_that_finds_nothing_wrong_any_more_clears_the_record(tmp_path: Path) -> None:
    store = chain(tmp_path)
    journal.write(store.dir, {"time": NOW, "points": {INC1: ["an earlier verify's finding"]}}, verify.DAMAGED)
    assert decide(store)[0] is None
    assert verify.verify(store, NOW, lambda _line: None) == {}
    assert not (store.dir / verify.DAMAGED).exists() and decide(store) == (INC2, "")


def test_a_record_that_does_not_parse_is_as_if_never_verified(tmp_path: Path) -> None:
    store = chain(tmp_path)
    (store.dir / verify.DAMAGED).write_text("{")
    assert verify.damaged_points(store) == {} and decide(store) == (INC2, "")


def test_a_point_deleted_from_the_middle_of_the_chain_makes_the_next_backup_a_full(tmp_path: Path) -> None:
    """The next backup used to add an incremental to a chain whose newest points could no longer be restored."""
    store = chain(tmp_path)
    store.remove_point(INC1)
    parent, why = decide(store)
    assert parent is None
    assert why == (f"the last point's chain cannot be restored (vm: restore point {INC1} is missing from {store.dir}"
                   f" (deleted or moved away): the points built on it cannot be restored ({INC2}); restore an"
                   " earlier point or one of a later chain)"), why
