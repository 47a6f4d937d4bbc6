"""backup-verify reads every point back, and the next backup does not extend a chain it found damaged or that is
missing a point: real files and checksums, the engine's own decision (no VM needed to decide)."""

from __future__ import annotations

from pathlib import Path

from kvmconf.backup import journal, verify
from kvmconf.backup.engine import Settings, _decide_incremental
from kvmconf.backup.libvirt_xml import VmDisk
from kvmconf.backup.store import DiskFile, Manifest, VmStore, checksum_file, write_point_files
from tests.test_backup_restore import read_only
from tests.test_provision_tasks import invoke
from tests.tools import ROOT, mount_tmpfs

FULL, INC1, INC2 = "20260101T000000Z", "20260102T000000Z", "20260103T000000Z"
DISKS = [VmDisk("vda", "/d/vm.qcow2", "qcow2")]
NOW = "20260104T000000Z"


def add_point(store: VmStore, time: str, parent: str | None, content: bytes) -> Manifest:
    point = store.point_dir(time)
    point.mkdir(parents=True)
    (point / "vda.qcow2").write_bytes(content)
    m = Manifest(store.vm, time, "full" if parent is None else "incremental", time if parent is None else FULL, parent,
                 f"kvmconf-{time}", True, [],
                 [DiskFile("vda", "/d/vm.qcow2", "qcow2", "vda.qcow2", 1 << 20, len(content),
                           checksum_file(point / "vda.qcow2"), None if parent is None else f"../{parent}/vda.qcow2")],
                 1.0)
    write_point_files(point, m)
    return m


def chain(tmp_path: Path, vm: str = "vm") -> VmStore:
    store = VmStore(tmp_path, vm)
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


def test_the_task_exits_1_naming_the_damage_and_the_nagios_check_goes_critical(tmp_path: Path) -> None:
    """`invoke backup-verify` and `backup-status --nagios` as the admin and Nagios run them, on the example cluster
    (provision's host, kvm0, is this machine: its URI is local) with its [backup] dir here and no NAS mounted."""
    site = tmp_path / "site.toml"
    site.write_text((ROOT / "site.toml").read_text().replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}/b"'))
    store = chain(tmp_path / "b", "provision")
    with (store.point_dir(INC2) / "vda.qcow2").open("r+b") as f:
        f.write(b"X")
    result = invoke("backup-verify", "--vm", "provision", site=site)
    problem = f"{store.point_dir(INC2) / 'vda.qcow2'}: checksum mismatch"
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == "kvmconf: damaged restore points for provision\n"
    lines = result.stdout.splitlines()
    assert lines[0] == ("backup-verify: the NAS copies are not verified: nas_dir /mnt/nas/kvmconf does not exist: is"
                        " the NAS share mounted? (kvmconf creates only the VM directories below it)"), lines
    assert lines[1:4] == [f"provision: {FULL}: ok (0.0 MiB)", f"provision: {INC1}: ok (0.0 MiB)",
                          f"provision: {INC2}: DAMAGED: {problem}"], lines
    assert lines[4].startswith("backup-verify: finished ") and lines[4].endswith(": damaged: provision"), lines
    nagios = invoke("backup-status", "--nagios", "--vm", "provision", site=site)
    assert nagios.returncode == 2, nagios.stdout
    assert nagios.stdout.startswith(f"BACKUP CRITICAL - provision: the newest point {INC2} cannot be restored"
                                    f" (backup-verify found damaged points: {INC2})"), nagios.stdout


def test_damage_in_an_older_chain_is_a_warning_and_shows_in_the_table(tmp_path: Path) -> None:
    import datetime as dt

    from kvmconf.backup import report

    store = chain(tmp_path)
    newer = add_point(store, NOW, None, b"a new full")  # the chain after the damaged one
    journal.write(store.dir, {"time": NOW, "points": {INC1: ["checksum mismatch"]}}, verify.DAMAGED)
    row = report.vm_status(tmp_path, None, "vm", dt.datetime(2026, 1, 4, 1, 0, tzinfo=dt.UTC))
    assert (row.damaged, row.newest_damaged, row.last_good) == ((INC1,), False, newer.time)
    limit = dt.timedelta(hours=26)
    assert report.nagios([row], limit) == (1, f"BACKUP WARNING - vm: backup-verify found damaged points: {INC1}")
    assert report.format_table([row], limit).splitlines()[1].endswith(f"backup-verify found damaged points: {INC1}")


def test_a_read_only_backup_disk_is_verified_and_what_is_found_said_though_not_recorded(tmp_path: Path) -> None:
    """As after a disk error (ext4's errors=remount-ro), when the README says to run it: it used to end in an
    OSError traceback, even on an intact store, and no later VM was verified."""
    with mount_tmpfs(tmp_path / "backups", "8m") as backups:
        store = chain(backups)
        with read_only(backups):
            logged: list[str] = []
            assert verify.verify(store, NOW, logged.append) == {}
            assert logged == [f"vm: {FULL}: ok (0.0 MiB)", f"vm: {INC1}: ok (0.0 MiB)", f"vm: {INC2}: ok (0.0 MiB)"]
        with (store.point_dir(INC2) / "vda.qcow2").open("r+b") as f:
            f.write(b"X")
        with read_only(backups):
            logged.clear()
            problem = f"{store.point_dir(INC2) / 'vda.qcow2'}: checksum mismatch"
            assert verify.verify(store, NOW, logged.append) == {INC2: [problem]}
            assert logged[2:] == [f"vm: {INC2}: DAMAGED: {problem}",
                                  f"vm: cannot record this in {store.dir / verify.DAMAGED} (Read-only file system):"
                                  " backup-status and the next backup go by what it holds until a verify can write"
                                  " it"], logged
        assert not (store.dir / verify.DAMAGED).exists()


def test_a_manifest_that_does_not_parse_is_one_vms_damage_and_the_next_vms_are_verified(tmp_path: Path) -> None:
    """It ended the run at that VM, with no word of the VMs after it (with --all, every later one unverified)."""
    site = tmp_path / "site.toml"
    site.write_text((ROOT / "site.toml").read_text().replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}/b"'))
    broken, intact = chain(tmp_path / "b", "provision"), chain(tmp_path / "b", "mcp")
    manifest = broken.point_dir(INC1) / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])  # truncated by a crash
    result = invoke("backup-verify", "--vm", "provision", "--vm", "mcp", site=site)
    assert (result.returncode, result.stderr) == (1, "kvmconf: damaged restore points for provision\n"), result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == (f"provision: {INC1}: DAMAGED: {manifest}: the restore point's manifest does not parse"
                        " (JSONDecodeError: Expecting property name enclosed in double quotes: line 3 column 2 (char"
                        f" 20)): rename {manifest.parent} to {manifest.parent}.damaged (any name that is not a point's"
                        " time) to go on; the points built on it then cannot be restored"), lines
    assert lines[2:5] == [f"mcp: {time}: ok (0.0 MiB)" for time in (FULL, INC1, INC2)], lines
    assert lines[5].endswith(": damaged: provision"), lines
    assert intact.points() and not (broken.dir / verify.DAMAGED).exists()


def test_a_vm_without_a_point_is_said_not_passed_over(tmp_path: Path) -> None:
    """It had no line at all, and the run's last line said "all intact" as if its backups had been checked."""
    logged: list[str] = []
    assert verify.verify(VmStore(tmp_path, "vm"), NOW, logged.append) == {}
    assert logged == [f"vm: no restore point in {tmp_path / 'vm'}: nothing to verify"]
