"""The NBD client and the one-pass copier against a real NBD server: qemu-nbd serving qcow2 images.

qemu-nbd speaks the same protocol as the export of a libvirt pull-mode backup job, including the
dirty-bitmap meta context (`--bitmap`), so full and incremental copies are checked here without a VM:
the result must read back identical (`qemu-img compare`), pass `qemu-img check`, be thin, and carry
the checksum of its own bytes.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path

import pytest

from kvmconf.backup import stream
from kvmconf.backup.failures import explain_os_error
from kvmconf.backup.nbd import Extent, NbdClient, NbdError
from kvmconf.backup.store import allocated, checksum_file
from kvmconf.processes import stop_pid
from tests.tools import ROOT, mount_ext4, mount_ramfs, mount_tmpfs, output_unless_hung, require_tool

MIB = 1024 * 1024

pytestmark = pytest.mark.services


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def make_image(path: Path, size: str, *writes: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if writes:
        qemu_io(path, *writes)
    return path


Serve = Callable[..., Path]


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start qemu-nbd on an image (read-only, export 'vda'); stopped by PID after the test."""
    require_tool("qemu-nbd")
    started: list[subprocess.Popen[bytes]] = []

    def start(image: Path, bitmap: str | None = None) -> Path:
        sock = tmp_path / f"nbd{len(started)}.sock"
        argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=4", "--export-name=vda", "--format=qcow2",
                f"--socket={sock}", *([f"--bitmap={bitmap}"] if bitmap else []), str(image)]
        started.append(subprocess.Popen(argv, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 30
        while not _accepts(sock):  # the socket file exists a moment before qemu-nbd listens on it
            assert started[-1].poll() is None, started[-1].stderr.read() if started[-1].stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        return sock

    yield start
    for process in started:
        stop_pid(process.pid)
        process.wait()


def _server_pid(sock: Path) -> int:
    """The PID of the qemu-nbd that `serve` started on this socket (a test stops and continues it)."""
    [pid] = subprocess.run(["pgrep", "-f", f"qemu-nbd.*--socket={sock}"], capture_output=True, text=True,
                           check=True).stdout.split()
    return int(pid)


def compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, check=False)


def check(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True, check=False)


def test_extents_are_merged_and_cover_the_export(tmp_path: Path, serve: Serve) -> None:
    image = make_image(tmp_path / "d.qcow2", "16M", "write -P 0x11 0 4M", "write -P 0x22 8M 4M")
    with NbdClient.connect(str(serve(image)), "vda") as client:
        assert client.size == 16 * MIB
        assert list(client.extents("base:allocation")) == [
            Extent(0, 4 * MIB, 0), Extent(4 * MIB, 4 * MIB, 3), Extent(8 * MIB, 4 * MIB, 0),
            Extent(12 * MIB, 4 * MIB, 3)]
        assert list(client.extents("base:allocation", 6 * MIB, 4 * MIB)) == [
            Extent(6 * MIB, 2 * MIB, 3), Extent(8 * MIB, 2 * MIB, 0)]


def test_unknown_export_and_context_are_refused_by_name(tmp_path: Path, serve: Serve) -> None:
    sock = serve(make_image(tmp_path / "d.qcow2", "1M"))
    with pytest.raises(NbdError, match="export 'vdb'"):
        NbdClient.connect(str(sock), "vdb")
    with pytest.raises(NbdError, match="export 'vda' has no meta context qemu:dirty-bitmap:nosuch"):
        NbdClient.connect(str(sock), "vda", ["base:allocation", "qemu:dirty-bitmap:nosuch"])
    with pytest.raises(NbdError, match=f"cannot connect to the NBD export 'vda' at {tmp_path}/none.sock"):
        NbdClient.connect(str(tmp_path / "none.sock"), "vda")


def test_full_copy_is_thin_identical_and_hashed_as_written(tmp_path: Path, serve: Serve) -> None:
    # An unaligned size, data in two L2 regions, a cluster of explicit zeros (stored by the source,
    # left out of ours), and more data than one pipeline round of buffers holds.
    image = make_image(tmp_path / "d.qcow2", str(600 * MIB + 4096), "write -P 0x11 1M 70M",
                       "write -P 0x22 520M 9M", "write -P 0 100M 64k", "write -P 0x33 600M 4096")
    done: list[int] = []
    with NbdClient.connect(str(serve(image)), "vda") as client:
        layout = stream.plan(client, None, None)
        checksum = stream.copy(client, layout, tmp_path / "full.qcow2", done.append)
    out = tmp_path / "full.qcow2"
    assert compare(out, image).returncode == 0, compare(out, image).stdout
    assert check(out).returncode == 0, check(out).stdout
    assert checksum == checksum_file(out)  # the hash of the bytes as written is the hash of the file
    assert done[0] == 0 and done[-1] == layout.data_size and done == sorted(done)
    # Thin: about the 79 MiB of data (plus metadata), not the 600 MiB disk; the zero cluster is a hole.
    assert 79 * MIB <= allocated(out) < 80 * MIB, allocated(out)


def test_incremental_stores_dirty_blocks_over_the_previous_copy(tmp_path: Path, serve: Serve) -> None:
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 32M")
    previous = tmp_path / "prev.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(previous)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "since-prev"], check=True)
    # After the previous copy: new data, an overwrite, and zeros over old data (they must not fall
    # through to the backing file's 0x11).
    qemu_io(image, "write -P 0x22 40M 2M", "write -P 0x33 1M 1M", "write -z 8M 4M")
    context = "qemu:dirty-bitmap:since-prev"
    with NbdClient.connect(str(serve(image, "since-prev")), "vda", ["base:allocation", context]) as client:
        layout = stream.plan(client, context, "prev.qcow2")
        checksum = stream.copy(client, layout, tmp_path / "inc.qcow2")
    inc = tmp_path / "inc.qcow2"
    assert compare(inc, image).returncode == 0, compare(inc, image).stdout
    assert check(inc).returncode == 0, check(inc).stdout
    info = subprocess.run(["qemu-img", "info", str(inc)], capture_output=True, text=True, check=True).stdout
    assert "backing file: prev.qcow2" in info
    assert checksum == checksum_file(inc)
    assert 3 * MIB <= allocated(inc) < 4 * MIB, allocated(inc)  # the 3 MiB written, not the zeros or the rest


def test_zeros_written_over_part_of_our_cluster_do_not_fall_through_to_the_previous_copy(
        tmp_path: Path, serve: Serve) -> None:
    """The VM's image tracks changes finer than our 64 KiB clusters: QEMU's dirty bitmap follows the image's own
    cluster size (4 KiB here). Zeros dirtied over part of one of our clusters used to be neither stored nor
    flagged: that part read through to the previous copy's old data, and a restore's own check (against the
    chain) could not see it."""
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(image), "4M"], check=True)
    qemu_io(image, "write -P 0x11 0 2M")
    previous = tmp_path / "prev.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(previous)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "since-prev"], check=True)
    # Inside one of our clusters, across two, and two kinds of zeros (unmapped, written) that cover one together.
    qemu_io(image, "write -z 8k 4k", "write -z 100k 40k", "write -z -u 256k 32k", "write -z 288k 32k",
            "write -P 0x22 512k 4k")
    context = "qemu:dirty-bitmap:since-prev"
    with NbdClient.connect(str(serve(image, "since-prev")), "vda", ["base:allocation", context]) as client:
        layout = stream.plan(client, context, "prev.qcow2")
        stream.copy(client, layout, tmp_path / "inc.qcow2")
    inc = tmp_path / "inc.qcow2"
    assert compare(inc, image).returncode == 0, compare(inc, image).stdout
    assert check(inc).returncode == 0, check(inc).stdout


def test_the_copy_goes_to_disk_around_the_page_cache(tmp_path: Path, serve: Serve) -> None:
    """A backup is read again only by a restore. Written through the page cache, it cost this process about one
    CPU-second per GiB in the kernel and pushed out what the host's VMs had cached. On a disk's filesystem it is
    written with direct I/O: none of it is left in the page cache."""
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 24M", "write -P 0x22 40M 64k")
    with mount_ext4(tmp_path / "disk", "64M") as disk, NbdClient.connect(str(serve(image)), "vda") as client:
        out = disk / "full.qcow2"
        checksum = stream.copy(client, stream.plan(client, None, None), out)
        # Before anything reads the copy back, which would bring it into the cache.
        cached = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(out)],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert cached == "0", f"{cached} bytes of the copy are in the page cache"
        assert compare(out, image).returncode == 0, compare(out, image).stdout
        assert checksum == checksum_file(out)


def test_a_filesystem_without_direct_io_gets_the_copy_written_through_the_page_cache(
        tmp_path: Path, serve: Serve) -> None:
    image = make_image(tmp_path / "d.qcow2", "16M", "write -P 0x11 1M 3M", "write -P 0x22 9M 64k")
    with mount_ramfs(tmp_path / "ram") as ram, NbdClient.connect(str(serve(image)), "vda") as client:
        out = ram / "full.qcow2"
        checksum = stream.copy(client, stream.plan(client, None, None), out)
        assert compare(out, image).returncode == 0, compare(out, image).stdout
        assert checksum == checksum_file(out)


# tmpfs fills up in the page cache; ext4 on a disk with direct I/O, whose full disk must show as ENOSPC, the error
# the message explains, not direct I/O's EINVAL. (ext4 fails the whole write; a write cut short, finished without
# direct I/O, is test_backup_stream_unit's.)
@pytest.mark.parametrize("mount", [partial(mount_tmpfs, size="4m"), partial(mount_ext4, size="16M")],
                         ids=["tmpfs", "ext4-direct-io"])
def test_a_full_target_raises_enospc_with_a_clear_message(
        tmp_path: Path, serve: Serve, mount: Callable[[Path], AbstractContextManager[Path]]) -> None:
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 24M")
    with mount(tmp_path / "small") as small:
        with NbdClient.connect(str(serve(image)), "vda") as client:
            layout = stream.plan(client, None, None)
            with pytest.raises(OSError) as raised:
                stream.copy(client, layout, small / "full.qcow2")
        assert raised.value.errno == errno.ENOSPC
        assert explain_os_error(raised.value, small) == \
            f"the backup target {small} is full (no space left on device): free space or move [backup] dir"


def test_server_gone_midway_is_an_nbd_error(tmp_path: Path, serve: Serve) -> None:
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 48M")
    sock = serve(image)
    with NbdClient.connect(str(sock), "vda") as client:
        layout = stream.plan(client, None, None)
        os.kill(_server_pid(sock), signal.SIGKILL)  # as QEMU dying
        with pytest.raises(NbdError, match="export 'vda': the NBD server went away"):
            stream.copy(client, layout, tmp_path / "full.qcow2")


def test_a_server_that_accepts_and_never_answers_times_out(tmp_path: Path) -> None:
    """A stalled export must not hang the run forever (holding the job, the VM's lock and every later run)."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)  # the kernel accepts the connection; nobody ever writes to it
        started = time.monotonic()
        with pytest.raises(NbdError) as raised:
            NbdClient.connect(str(path), "vda", timeout=0.5)
        assert str(raised.value) == "export 'vda': the NBD server did not answer in 0.5 s (the VM's storage may hang)"
        assert time.monotonic() - started < 5


def test_an_export_that_stalls_midway_times_out(tmp_path: Path, serve: Serve) -> None:
    """qemu-nbd stopped (SIGSTOP) after the handshake: the reads then wait for an answer that does not come."""
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 48M")
    sock = serve(image)
    client = NbdClient.connect(str(sock), "vda", timeout=1.0)
    layout = stream.plan(client, None, None)
    pid = _server_pid(sock)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(NbdError) as raised:
            stream.copy(client, layout, tmp_path / "full.qcow2")
        assert str(raised.value) == "export 'vda': the NBD server did not answer in 1 s (the VM's storage may hang)"
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close()


def _interrupted_copy(*args: str) -> list[str]:
    """Run tests/interrupted_copy.py; its lines. A copy that hangs fails with where each thread was."""
    child = subprocess.Popen([sys.executable, "-m", "tests.interrupted_copy", *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return output_unless_hung(child, 60).splitlines()


def test_sigterm_inside_the_hand_over_to_the_hash_thread_ends_the_copy(tmp_path: Path, serve: Serve) -> None:
    """CI hung here once: SIGTERM raised KeyboardInterrupt inside the queue's notify, which lost the next wake-up of
    the thread the main thread hands buffers to, and the copy waited for it for ever (see tests/interrupted_copy.py)."""
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 48M")
    assert _interrupted_copy("inside-notify", str(serve(image)), str(tmp_path / "full.qcow2")) == [
        "interrupted", "signal sent inside notify", "pipeline threads ended"]


def test_sigterm_while_the_export_stalls_ends_the_copy_at_once(tmp_path: Path, serve: Serve) -> None:
    """Not after the connection's timeout (60 s here, 5 min in a backup): Ctrl-C on a hung VM must still work."""
    image = make_image(tmp_path / "d.qcow2", "64M", "write -P 0x11 0 48M")
    sock = serve(image)
    pid = _server_pid(sock)
    try:
        lines = _interrupted_copy("stalled-read", str(sock), str(tmp_path / "full.qcow2"), str(pid))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert lines[0] == "interrupted" and lines[2] == "pipeline threads ended", lines
    assert float(lines[1].split()[1]) < 5, lines


def test_os_errors_name_the_file_they_are_about_and_a_full_disk_its_directory(tmp_path: Path) -> None:
    """A read-only NAS used to be reported as '<local backup dir>: Read-only file system'."""
    target = tmp_path / "local" / "vm1"
    with mount_tmpfs(tmp_path / "nas", "1m", read_only=True) as read_only:
        with pytest.raises(OSError) as raised:
            (read_only / "vda.qcow2").write_bytes(b"x")
        assert explain_os_error(raised.value, target) == f"{read_only}/vda.qcow2: Read-only file system"
    # A full filesystem named by the error but outside the backup target (the job's scratch directory).
    full = OSError(errno.ENOSPC, "No space left on device", "/var/tmp/kvmconf-backup-1-x/vda.scratch")
    assert explain_os_error(full, target) == \
        "/var/tmp/kvmconf-backup-1-x is full (no space left on device): free space there"
    # A missing [backup] scratch_dir: the directory itself, not its parent, which exists.
    gone = OSError(errno.ENOENT, "No such file or directory", "/srv/kvmconf-scratch")
    assert explain_os_error(gone, target) == "/srv/kvmconf-scratch: No such file or directory"
    inside = OSError(errno.ENOSPC, "No space left on device", str(target / "20260101T000000Z.partial"))
    assert explain_os_error(inside, target) == \
        f"the backup target {target} is full (no space left on device): free space or move [backup] dir"
