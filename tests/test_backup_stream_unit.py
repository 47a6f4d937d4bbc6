"""The pure parts of a backup's copy: cutting dirty ranges, planning a full, explaining errors (no NBD server)."""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

import pytest

from kvmconf.backup import pull_job, qcow2, stream
from kvmconf.backup.failures import BackupFailed, explain_libvirt_error
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
    job = pull_job.JobDir(tmp_path / "nosuch" / "kvmconf-backup-1-20260101T000000Z", {}, None, "vm1")
    with pytest.raises(BackupFailed) as err:
        pull_job.check_scratch_space(job, [])
    assert str(err.value) == f"[backup] scratch_dir {tmp_path / 'nosuch'} does not exist: `fab kvm-setup` creates it"


def test_a_direct_write_cut_short_is_finished_through_the_page_cache(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 and XFS return a full disk's error for the whole direct write, so none here cuts one short: the first
    pwrite is faked to write a part (through a second, buffered descriptor) and return. The real kernel then
    refuses the unaligned rest with EINVAL unless direct I/O is off for it."""
    target = tmp_path / "f"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    data = mmap.mmap(-1, qcow2.CLUSTER_SIZE)  # page-aligned, as the pipeline's buffers are
    data[:] = bytes(range(256)) * (qcow2.CLUSTER_SIZE // 256)
    real_pwrite, calls = os.pwrite, []

    def part_first(fd_: int, view: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            return real_pwrite(fd_, view, offset)
        buffered = os.open(target, os.O_WRONLY)
        try:
            return real_pwrite(buffered, view[:1000], offset)
        finally:
            os.close(buffered)

    try:
        assert stream.direct_io(fd, True), f"{tmp_path} has no direct I/O: this test needs a disk's filesystem"
        monkeypatch.setattr(os, "pwrite", part_first)
        stream.write_fully(fd, memoryview(data), 0)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert calls == [0, 1000]
    assert target.read_bytes() == bytes(data)
