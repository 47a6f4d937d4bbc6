"""Copy one disk of a pull-mode backup into a thin qcow2 file in one sequential pass, hashing as it goes.

What to store comes from the export's extents: a full stores what ``base:allocation`` says holds
data; an incremental stores the dirty blocks (the job's ``qemu:dirty-bitmap:backup-<dev>``) that hold
data and marks the dirty blocks that now read as zeros. ``qcow2.plan`` lays the file out before a
byte is written, so the file is written front to back and its checksum (store.CHECKSUM) is computed from the
same buffers: the backup is never read a second time.

Three stages overlap: the caller's thread keeps reads in flight on the export, a thread hashes each
buffer in file order, and WRITERS threads write them, each to its own place in the file. A direct write
waits for the disk, so hashing in the same thread left the disk idle between writes: a 1 GiB full took a
median 1.34-1.41 s against 1.49-1.50 s with one thread that hashed and wrote (two A/B runs of 10 and 12
alternating rounds). Two writers keep two writes in flight: writing alone, this disk took 0.41-0.48 s per
GiB with 4 in flight against 0.71 with one; while QEMU reads the same disk for the export, one, two or
three writers were within a few percent of each other.

The file is written with direct I/O (O_DIRECT) where its filesystem allows it, from the pipeline's own
buffers, not through the page cache. Copying into the page cache was most of this process's CPU time (a
1 GiB full: about 1.0 CPU-second in the kernel, against 0.35 direct), CPU that QEMU's NBD server needs on
a host of few cores; it pushed the cache of the host's VMs out for data that is read again only by a
restore; and the point was not on disk when the run ended. The bench's 1 GiB full now returns in about
1.4 s rather than 1.0 s, but the buffered one still had about 0.45 s of writing to do after it, and once
a backup is larger than what the kernel lets wait in memory (dirty pages: 20% of the RAM) buffered writes
wait for the disk too. Filesystems without direct I/O (ramfs, some FUSE ones) get buffered writes. Either
way durability.py flushes the points before any older one is deleted, and verifies them after a reboot.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmconf.backup import qcow2
from kvmconf.backup.nbd import STATE_DIRTY, STATE_ZERO, Extent, NbdClient
from kvmconf.backup.store import checksum_text, new_hash
from kvmconf.signals import interrupts_deferred

# What is hashed and written at a time: a multiple of the cluster, filled by several NBD reads.
CHUNK = 1024 * 1024
# Per NBD read. QEMU's NBD server allocates a buffer per read: at 1 MiB and more it gets fresh memory
# each time, and faulting that in cost QEMU 0.9-1.0 CPU-s per GiB of a full, against 0.3-0.5 at
# 512 KiB (0.4-0.6 at 256 KiB), on a machine whose two CPUs QEMU and this process share: a 1 GiB full
# took 0.69-1.09 s with 512 KiB reads, 1.08-1.66 s with 1 MiB. (A 20 MiB incremental was also quicker
# with 1 MiB chunks than with 2-4 MiB: the first data arrives sooner.)
READ = 512 * 1024
IN_FLIGHT = 8 * 1024 * 1024  # keeps the server and the disk busy; 16-32 MiB were no faster (5 runs each)
WRITERS = 2
_BUFFERS = IN_FLIGHT // CHUNK + 4 + WRITERS  # in flight + being hashed + being written + queued between stages
_PROBE = bytes(16)
_ZERO_CLUSTER = bytes(qcow2.CLUSTER_SIZE)

_Chunk = tuple[int, int, mmap.mmap]  # where it goes in the file, its length, the buffer holding it
Progress = Callable[[int], None]  # called with the bytes of this disk done so far


def plan(client: NbdClient, dirty_context: str | None, backing: str | None) -> qcow2.Layout:
    """The file for this export: everything with data (full), or the dirty blocks over `backing`."""
    allocation = list(client.extents("base:allocation"))
    if dirty_context is None:
        return qcow2.plan(client.size, [(e.offset, e.length) for e in allocation if not e.flags & STATE_ZERO])
    dirty = [e for e in client.extents(dirty_context) if e.flags & STATE_DIRTY]
    data: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    for part in intersect(dirty, allocation):
        (zero if part.flags & STATE_ZERO else data).append((part.offset, part.length))
    return qcow2.plan(client.size, data, zero, backing)


def intersect(dirty: list[Extent], allocation: list[Extent]) -> Iterator[Extent]:
    """The dirty ranges, cut where the allocation extents change, each with its allocation flags."""
    i = 0
    for d in dirty:
        while i < len(allocation) and allocation[i].end <= d.offset:
            i += 1
        j = i
        while j < len(allocation) and allocation[j].offset < d.end:
            a = allocation[j]
            start, end = max(a.offset, d.offset), min(a.end, d.end)
            if start < end:
                yield Extent(start, end - start, a.flags)
            j += 1


def copy(client: NbdClient, layout: qcow2.Layout, target: Path, progress: Progress = lambda _n: None) -> str:
    """Write `layout`'s file at `target` (a new file) from the export, front to back; its checksum (DiskFile's)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, layout.file_size)  # sparse: clusters of zeros are simply never written
        direct_io(fd, True)
        return _Pipeline(client, fd, progress).run(layout)
    finally:
        os.close(fd)


def direct_io(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; False if its filesystem has none. (Set here rather than passed to
    open(): an open with O_DIRECT that the filesystem refuses has already created the file.) Every write of
    the pipeline is whole clusters at cluster offsets from page-aligned buffers, as direct I/O needs."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return False
    return True


def write_fully(fd: int, view: memoryview, offset: int) -> None:
    """pwrite all of `view` at `offset`. A filesystem may write part and return before the error (a full disk): the
    rest may then be unaligned, which direct I/O refuses (EINVAL), so it is written through the page cache, where
    it works or fails with the error that explains it."""
    written = os.pwrite(fd, view, offset)
    while written < len(view):
        direct_io(fd, False)
        written += os.pwrite(fd, view[written:], offset + written)


class _Pipeline:
    def __init__(self, client: NbdClient, fd: int, progress: Progress) -> None:
        self.client = client
        self.fd = fd
        self.progress = progress
        self.read = min(READ, client.max_request)
        # NBD reads land in these buffers directly; they go round the three stages. None ends a stage.
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(_BUFFERS):
            self.free.put(mmap.mmap(-1, CHUNK))
        self.filled: queue.Queue[_Chunk | None] = queue.Queue()  # read, in file order: to hash
        self.hashed: queue.Queue[_Chunk | None] = queue.Queue()  # to write, in any order
        self.hash = new_hash()
        self.failed: BaseException | None = None  # the first error of a hash or write thread
        self.abandoned = False  # the reads failed: the threads skip what is still queued

    def run(self, layout: qcow2.Layout) -> str:
        # A Ctrl-C or SIGTERM is raised only between chunks, never inside the queues' hand-over (see
        # interrupts_deferred: the writer would wait for ever); the socket is shut down at once, so a read
        # the server does not answer fails now instead of after the connection's timeout.
        with interrupts_deferred(wake=self.client.abort) as interrupt_point:
            workers = [threading.Thread(target=self._hash, name="backup-hash", daemon=True)]
            workers += [threading.Thread(target=self._write_some, name="backup-write", daemon=True)
                        for _ in range(WRITERS)]
            for worker in workers:
                worker.start()
            try:
                self._metadata(layout.metadata)
                done = 0
                self.progress(done)  # a disk with nothing to copy shows 0/0 and is done
                for host, length, buffer in self._reads(layout):
                    interrupt_point()
                    self.filled.put((host, length, buffer))
                    done += length
                    self.progress(done)
                    if self.failed is not None:
                        break
            except BaseException:
                self.abandoned = True
                raise
            finally:
                self.filled.put(None)
                for worker in workers:
                    worker.join()
        if self.failed is not None:
            raise self.failed
        return checksum_text(self.hash)

    def _metadata(self, metadata: bytes) -> None:
        for at in range(0, len(metadata), CHUNK):
            piece = metadata[at:at + CHUNK]
            buffer = self._take()
            buffer[:len(piece)] = piece
            self.filled.put((at, len(piece), buffer))

    def _take(self) -> mmap.mmap:
        while True:
            if self.failed is not None:
                raise self.failed
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                continue

    def _reads(self, layout: qcow2.Layout) -> Iterator[_Chunk]:
        """(host offset, length, buffer) of every data chunk, in file order, as the reads complete."""
        pieces: deque[tuple[int, int, mmap.mmap, int]] = deque()  # requested, not yet complete; its reads

        def requests() -> Iterator[tuple[int, memoryview]]:
            host = layout.data_offset
            for guest, length in layout.runs:
                for at in range(0, length, CHUNK):
                    n = min(CHUNK, length - at)
                    # Runs are whole clusters: the last one may pass a virtual size that is not a cluster
                    # multiple. Its tail is not on the export; it must read as zeros in the file. (Every
                    # chunk starts below the size, so each has at least one read.)
                    readable = min(n, self.client.size - (guest + at))
                    buffer = self._take()
                    if readable < n:
                        buffer[readable:n] = bytes(n - readable)
                    view = memoryview(buffer)
                    starts = range(0, readable, self.read)
                    pieces.append((host + at, n, buffer, len(starts)))
                    for start in starts:
                        yield guest + at + start, view[start:min(start + self.read, readable)]
                host += length

        left = 0  # reads of the oldest chunk still to complete (read_many completes them in order)
        for _ in self.client.read_many(requests(), IN_FLIGHT // self.read):
            left = left or pieces[0][3]
            left -= 1
            if left == 0:
                host, length, buffer, _ = pieces.popleft()
                yield host, length, buffer

    def _hash(self) -> None:
        """Hash each buffer in file order and pass it on to the writers; then end each writer."""
        try:
            while (item := self.filled.get()) is not None:
                if self.failed is None and not self.abandoned:
                    self.hash.update(memoryview(item[2])[:item[1]])  # releases the GIL: the reads go on
                self.hashed.put(item)
        except BaseException as err:  # handed to the caller's thread, which raises it
            self.failed = self.failed or err
        finally:
            for _ in range(WRITERS):
                self.hashed.put(None)

    def _write_some(self) -> None:
        """A writer: write buffers until the end. An error stops the copy and reaches run()."""
        while (item := self.hashed.get()) is not None:
            host, length, buffer = item
            try:
                if self.failed is None and not self.abandoned:
                    self._write(host, length, buffer)
            except BaseException as err:  # handed to the caller's thread, which raises it
                self.failed = self.failed or err
            finally:
                self.free.put(buffer)

    def _write(self, host: int, length: int, buffer: mmap.mmap) -> None:
        """Write the buffer's clusters that are not all zeros (the file is sparse: zeros cost nothing)."""
        view = memoryview(buffer)
        start = None  # start of the current run of non-zero clusters
        for at in range(0, length, qcow2.CLUSTER_SIZE):
            end = at + qcow2.CLUSTER_SIZE  # lengths are whole clusters
            # The 16-byte probe keeps the full comparison (a copy) for clusters that start with zeros.
            if view[at:at + 16] == _PROBE and view[at:end].tobytes() == _ZERO_CLUSTER:
                if start is not None:
                    write_fully(self.fd, view[start:at], host + start)
                    start = None
            elif start is None:
                start = at
        if start is not None:
            write_fully(self.fd, view[start:length], host + start)

