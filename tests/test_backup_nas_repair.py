"""A NAS copy backup-verify found damaged is replaced by the next NAS stage with a verified copy of the local point.

It used to stay damaged until retention removed its chain: the stage took it for copied, built the chain's later
points on it on the NAS, and backup-status counted it as a copy. Real files, checksums and manifests; the NAS a tmpfs
of its own (root), damaged by writing a byte into a copy, as rot on the NAS would.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmconf.backup import journal, report, verify
from kvmconf.backup.nas import NasFailed, stage
from kvmconf.backup.store import VmStore
from tests.labs import quiet
from tests.test_backup_verify import FULL, INC1, INC2, NOW, add_point, chain
from tests.tools import mount_tmpfs


@pytest.fixture
def nas(tmp_path: Path) -> Iterator[VmStore]:
    with mount_tmpfs(tmp_path / "nas", "1m") as root:
        yield VmStore(root, "vm")


def rot(store: VmStore, time: str) -> None:
    with (store.point_dir(time) / "vda.qcow2").open("r+b") as f:
        f.write(b"X")


def test_a_nas_copy_found_damaged_is_replaced_by_a_verified_copy(tmp_path: Path, nas: VmStore) -> None:
    local = chain(tmp_path / "local")
    assert stage(local, nas, 5, quiet) == [FULL, INC1, INC2]
    rot(nas, FULL)
    assert list(verify.verify(nas, NOW, quiet)) == [FULL]
    newer = add_point(local, NOW, INC2, b"inc3")  # the next backup's point
    lines: list[str] = []
    assert stage(local, nas, 5, lines.append) == [FULL, newer.time]
    assert lines == [f"vm: NAS: copied and verified {FULL} (replacing the copy backup-verify found damaged)",
                     f"vm: NAS: copied and verified {newer.time}"]
    assert [nas.verify(m) for m in nas.points()] == [[], [], [], []]
    assert verify.damaged_points(nas) == {} and not (nas.dir / verify.DAMAGED).exists()
    assert nas.partials() == []


def test_a_copy_damaged_here_too_keeps_the_nas_copy_and_its_record(tmp_path: Path, nas: VmStore) -> None:
    """Only a verified copy replaces the NAS's: the local point damaged as well is said, and nothing is removed."""
    local = chain(tmp_path / "local")
    stage(local, nas, 5, quiet)
    rot(nas, INC1)
    rot(local, INC1)
    verify.verify(nas, NOW, quiet)
    record = journal.read(nas.dir, verify.DAMAGED)
    with pytest.raises(NasFailed) as failed:
        stage(local, nas, 5, quiet)
    assert str(failed.value).startswith(f"vm: restore point {INC1} is damaged here (checksum mismatch: vda.qcow2 in"
                                        f" {local.point_dir(INC1)}): not copied to the NAS"), failed.value
    assert [m.time for m in nas.points()] == [FULL, INC1, INC2] and nas.partials() == []
    assert journal.read(nas.dir, verify.DAMAGED) == record


def test_backup_status_shows_damaged_nas_copies_until_the_nas_stage_replaces_them(tmp_path: Path,
                                                                                   nas: VmStore) -> None:
    """They were recorded, and the README said backup-status did not show them: a NAS the admin counts on for a lost
    backup disk held a copy that could not be restored, and neither the table nor Nagios said so."""
    local = chain(tmp_path / "local")
    stage(local, nas, 5, quiet)
    rot(nas, INC1)
    verify.verify(nas, NOW, quiet)
    now, limit = dt.datetime(2026, 1, 3, 1, 0, tzinfo=dt.UTC), dt.timedelta(hours=26)
    row = report.vm_status(local.root, nas.root, "vm", now)
    assert (row.nas_points, row.nas_damaged, row.damaged) == (3, (INC1,), ())
    said = f"backup-verify found damaged NAS copies: {INC1} (the next backup's NAS stage copies them again)"
    assert report.format_table([row], limit).splitlines()[1].endswith(f"   3  {said}")
    assert report.nagios([row], limit) == (1, f"BACKUP WARNING - vm: {said}")
    stage(local, nas, 5, quiet)
    row = report.vm_status(local.root, nas.root, "vm", now)
    assert (row.nas_points, row.nas_damaged) == (3, ())
    assert report.nagios([row], limit) == (0, "BACKUP OK - vm 1.0 h")
