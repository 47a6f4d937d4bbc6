"""The pure parts of a backup's copy: cutting dirty ranges, planning a full, explaining errors (no NBD server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmconf.backup import engine, qcow2, stream
from kvmconf.backup.engine import BackupFailed, explain_libvirt_error
from kvmconf.backup.nbd import Extent


def test_intersect_cuts_dirty_ranges_at_allocation_changes() -> None:
    allocation = [Extent(0, 10, 0), Extent(10, 10, 3), Extent(20, 10, 0)]
    dirty = [Extent(5, 10, 1), Extent(18, 4, 1), Extent(29, 1, 1)]
    assert list(stream.intersect(dirty, allocation)) == [
        Extent(5, 5, 0), Extent(10, 5, 3), Extent(18, 2, 3), Extent(20, 2, 0), Extent(29, 1, 0)]


def test_plan_of_a_full_leaves_holes_and_zeros_out() -> None:
    class Fake:
        size = 4 * qcow2.CLUSTER_SIZE

        def extents(self, context: str) -> list[Extent]:
            c = qcow2.CLUSTER_SIZE
            return [Extent(0, c, 0), Extent(c, c, 3), Extent(2 * c, c, 2), Extent(3 * c, c, 0)]

    layout = stream.plan(Fake(), None, None)  # type: ignore[arg-type]
    assert layout.runs == ((0, qcow2.CLUSTER_SIZE), (3 * qcow2.CLUSTER_SIZE, qcow2.CLUSTER_SIZE))


def test_libvirt_running_out_of_space_blames_scratch_or_vm_storage_not_the_target() -> None:
    """In pull mode libvirt never writes the backup target: this process does."""
    text = "unable to execute QEMU command 'blockdev-create': Could not write qcow2 header: No space left on device"
    assert explain_libvirt_error(text, Path("/srv/scratch")) == (
        "no space left for the backup job's scratch files (under /srv/scratch, [backup] scratch_dir) or on the VM's own"
        f" storage: free space there ({text})")
    assert explain_libvirt_error("domain is not running", Path("/var/tmp")) == "domain is not running"


def test_a_missing_scratch_dir_is_said_with_the_way_to_make_it(tmp_path: Path) -> None:
    job = engine._Job(tmp_path / "nosuch" / "kvmconf-backup-1-20260101T000000Z", {}, None)
    with pytest.raises(BackupFailed) as err:
        engine._check_scratch_space(job, [])
    assert str(err.value) == f"[backup] scratch_dir {tmp_path / 'nosuch'} does not exist: `fab kvm-setup` creates it"
