"""Plan a thin qcow2 v3 file completely before writing it, so it can be written in ONE sequential pass.

A backup of a running VM reads the disk over NBD and writes the backup file itself, hashing every byte as
it goes: no second read for the checksum, and no seeking back to patch metadata. So every piece of qcow2
metadata is computed here, up front, from the list of guest ranges to store, and the file is then

    cluster 0          header (v3, 112 bytes), header extensions (backing format name when there is a
                       backing file, end marker), then the backing file name
    L1 table           one entry per 512 MiB region of the virtual disk (cluster aligned)
    refcount table     pointers to the refcount blocks
    refcount blocks    a 16-bit refcount of 1 for every cluster of the file, these blocks included
    L2 tables          one per 512 MiB region holding at least one data or zero-flagged cluster
    data clusters      the runs, in guest order, back to back

64 KiB clusters, 16-bit refcounts; no compression, encryption, snapshots, bitmaps, extended L2 or lazy
refcounts: a plain file stock `qemu-img` reads. Host data clusters follow guest order, so a run of guest
clusters is a run of consecutive host clusters and the L2 entries of a run are an arithmetic sequence,
built with byte slices rather than per-cluster Python code (a 1 TiB disk has 16M clusters).

An incremental is the same file with a backing file name: unallocated L2 entries (0) read from the backing
file, zero-flagged ones (bit 0, no host cluster) read as zeros whatever the backing file holds. Every used
cluster has refcount 1, so L1 and L2 entries carry the COPIED flag as qemu's own do.

qemu sizes disks in 512-byte sectors: the header holds the virtual size rounded up to a sector (like
`qemu-img create`), otherwise qemu would silently drop a partial last sector.
"""

from __future__ import annotations

import mmap
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts, what qemu-img create uses by default
L2_ENTRIES = CLUSTER_SIZE // 8
REGION_SIZE = L2_ENTRIES * CLUSTER_SIZE  # guest bytes one L2 table maps: 512 MiB
REFCOUNTS_PER_BLOCK = CLUSTER_SIZE * 8 >> REFCOUNT_ORDER  # 32768 clusters (2 GiB of file) per refcount block
REFTABLE_ENTRIES = CLUSTER_SIZE // 8  # refcount blocks one refcount table cluster points to

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 112  # the v3 header with the compression_type byte (0 = zlib, unused), as qemu writes it
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQIIB7x")
_SIZE_FIELD = 24  # offset of the virtual size in the header
EXT_BACKING_FORMAT = 0xE2792ACA
_EXT = struct.Struct(">II")
MAX_BACKING_NAME = 1023  # qemu refuses to open an image whose backing file name is longer
MAX_BACKING_FORMAT = 15  # qemu reads the format name into a char[16]

COPIED = 1 << 63  # refcount is exactly 1: qemu may write in place; `qemu-img check` wants it set then
ZERO_FLAG = 1  # v3 L2 entry bit 0: the cluster reads as zeros
MAX_HOST_CLUSTERS = 1 << 40  # L1/L2 entries hold host offsets in bits 9-55
SECTOR = 512  # qemu keeps disk sizes in sectors and drops a partial last one when it opens an image

# Periodic byte patterns for the two low bytes of consecutive cluster numbers, long enough that any window
# of L2_ENTRIES of them is a plain slice (no copy of the pattern per L2 table).
_BYTE0 = bytes(range(256)) * (L2_ENTRIES // 256 + 1)  # n & 0xff, from any start in 0..255
_BYTE1_PERIOD = b"".join(bytes([v]) * 256 for v in range(256))  # (n >> 8) & 0xff for n in 0..65535
_BYTE1 = _BYTE1_PERIOD + _BYTE1_PERIOD[:L2_ENTRIES]


@dataclass(frozen=True)
class Layout:
    """Everything to write: `metadata` from offset 0, then the guest data of `runs`, back to back."""

    metadata: bytes = field(repr=False)  # up to ~160 MiB for 1 TiB of data: never in a repr
    runs: tuple[tuple[int, int], ...]

    @property
    def data_offset(self) -> int:
        return len(self.metadata)

    @property
    def data_size(self) -> int:
        """The guest bytes the file holds (what a copy reads from the disk)."""
        return sum(length for _, length in self.runs)

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size

    @property
    def virtual_size(self) -> int:
        """The disk size in the header: the planned one rounded up to a whole sector."""
        size = header_size(self.metadata)
        assert size is not None  # plan() wrote this header
        return size


def header_size(header: bytes) -> int | None:
    """The virtual size in a qcow2 header (its first 32 bytes), None if `header` is not one.

    It is QEMU's size of the disk: QEMU takes it from here on open, and a resize rewrites it (sizes
    are always whole sectors, so nothing is dropped).
    """
    if len(header) < _SIZE_FIELD + 8 or header[:4] != MAGIC:
        return None
    size: int = struct.unpack_from(">Q", header, _SIZE_FIELD)[0]
    return size


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _checked(ranges: Iterable[tuple[int, int]], virtual_size: int, what: str) -> list[tuple[int, int]]:
    """The non-empty (start, end) byte ranges; a range outside the disk is a caller bug, not something to clip."""
    out = []
    for offset, length in ranges:
        if offset < 0 or length < 0 or offset + length > virtual_size:
            raise ValueError(f"{what} range ({offset}, {length}) is not within the virtual size {virtual_size}")
        if length:
            out.append((offset, offset + length))
    return out


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent [start, end) intervals covering the same points."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(i for i in intervals if i[0] < i[1]):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _partial_clusters(ranges: list[tuple[int, int]], virtual_size: int) -> list[tuple[int, int]]:
    """The pieces of these byte ranges that cover a cluster only in part (the disk's last cluster is whole from
    its start to the end of the disk: what lies past the end is never read)."""
    pieces = []
    for start, end in ranges:
        head_end = min(end, _ceil(start, CLUSTER_SIZE) * CLUSTER_SIZE)
        if start < head_end:
            pieces.append((start, head_end))
        tail_start = max(head_end, end // CLUSTER_SIZE * CLUSTER_SIZE)
        if tail_start < end and end != virtual_size:
            pieces.append((tail_start, end))
    return pieces


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """a minus b, both merged (sorted, disjoint)."""
    out = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while start < end:
            if k >= len(b) or b[k][0] >= end:
                out.append((start, end))
                break
            if b[k][0] > start:
                out.append((start, b[k][0]))
            start = max(start, b[k][1])
            k += 1
    return out


def _split_regions(start: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(region, first cluster, count) pieces of the cluster interval [start, end), one per L2 table."""
    while start < end:
        region = start // L2_ENTRIES
        stop = min(end, (region + 1) * L2_ENTRIES)
        yield region, start, stop - start
        start = stop


def _put_data_entries(buf: mmap.mmap, pos: int, host: int, count: int) -> None:
    """Write `count` L2 entries COPIED | (host + i) << 16 at buf[pos:], big-endian, count <= L2_ENTRIES.

    Byte k of every entry is written as one strided slice: bytes 4 and 5 (the two low bytes of the cluster
    number) are windows of periodic patterns, bytes 0-3 take at most two values over one L2 table.
    """
    end = pos + 8 * count
    buf[pos + 5:end:8] = _BYTE0[host & 0xFF:(host & 0xFF) + count]
    buf[pos + 4:end:8] = _BYTE1[host & 0xFFFF:(host & 0xFFFF) + count]
    for byte, shift in ((0, 40), (1, 32), (2, 24), (3, 16)):
        first, last = host >> shift, (host + count - 1) >> shift
        mark = 0x80 if byte == 0 else 0  # COPIED is bit 63, in byte 0
        if first == last:
            value = (first & 0xFF) | mark
            if value:  # the buffer starts zeroed
                buf[pos + byte:end:8] = bytes([value]) * count
        else:
            split = (last << shift) - host  # entries before the carry into this byte
            buf[pos + byte:end:8] = (bytes([(first & 0xFF) | mark]) * split
                                     + bytes([(last & 0xFF) | mark]) * (count - split))


def _be64(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        values.byteswap()
    return values.tobytes()


def _header_cluster(virtual_size: int, backing: str | None, backing_format: str, l1_size: int, l1_offset: int,
                    reftable_offset: int, reftable_clusters: int) -> bytes:
    extensions = b""
    name = b""
    if backing is not None:
        name = backing.encode()
        fmt = backing_format.encode()
        if not name:
            raise ValueError("backing file name is empty")
        if len(name) > MAX_BACKING_NAME:
            raise ValueError(f"backing file name is {len(name)} bytes long, qemu accepts at most {MAX_BACKING_NAME}")
        if not fmt or len(fmt) > MAX_BACKING_FORMAT:
            raise ValueError(f"backing format {backing_format!r} must be 1 to {MAX_BACKING_FORMAT} bytes long")
        extensions += _EXT.pack(EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    extensions += _EXT.pack(0, 0)  # end of header extensions
    # qemu reads header extensions up to the backing file name, so the name comes after them.
    name_offset = HEADER_LENGTH + len(extensions)
    if name_offset + len(name) > CLUSTER_SIZE:
        raise ValueError(f"backing file name ({len(name)} bytes) does not fit in the header cluster")
    # Rounded up to a whole sector, as `qemu-img create` and `convert` do: qemu would otherwise cut off the
    # disk's last bytes; what it adds reads as zeros (the last cluster is stored whole anyway).
    size = _ceil(virtual_size, SECTOR) * SECTOR
    header = _HEADER.pack(
        MAGIC, VERSION, name_offset if name else 0, len(name), CLUSTER_BITS, size,
        0,  # no encryption
        l1_size, l1_offset, reftable_offset, reftable_clusters,
        0, 0,  # no snapshots
        0, 0, 0,  # incompatible (not dirty, not corrupt), compatible (no lazy refcounts), autoclear features
        REFCOUNT_ORDER, HEADER_LENGTH,
        0,  # compression type zlib (never used: nothing is compressed)
    )
    return header + extensions + name


def plan(virtual_size: int, data: Iterable[tuple[int, int]], zero: Iterable[tuple[int, int]] = (),
         backing: str | None = None, backing_format: str = "qcow2") -> Layout:
    """data: guest byte ranges (offset, length), any alignment, maybe overlapping/unsorted, to be stored:
    rounded OUT to whole clusters, merged, sorted. zero: guest ranges that must read as zeros even over a
    backing file, merged: the whole clusters they cover (a range reaching the end of the disk covers its last,
    partial cluster) get the L2 'reads as zero' flag (bit 0) with no host cluster, unless also data; a cluster
    they cover only in part is stored as data (read from the source like the data ranges), as a flag can only
    make a whole cluster read as zeros and the rest of it must come from the source too.
    Every other cluster is unallocated (entry 0: reads from the backing file, or zeros without one).
    A range outside [0, virtual_size) raises ValueError, as does a backing name that does not fit the header.
    """
    if virtual_size < 0:
        raise ValueError(f"virtual size {virtual_size} is negative")
    disk_clusters = _ceil(virtual_size, CLUSTER_SIZE)
    # Merged before rounding: two zero ranges that share a cluster may cover it together.
    zero_ranges = _merge(_checked(zero, virtual_size, "zero"))
    data_clusters = _merge((s // CLUSTER_SIZE, _ceil(e, CLUSTER_SIZE))
                           for s, e in _checked(data, virtual_size, "data") + _partial_clusters(zero_ranges,
                                                                                               virtual_size))
    zero_clusters = _subtract(
        _merge((_ceil(s, CLUSTER_SIZE), disk_clusters if e == virtual_size else e // CLUSTER_SIZE)
               for s, e in zero_ranges),
        data_clusters)
    # One L2 table per region touched by data or zeros; the L1 entries of the others stay 0.
    regions: set[int] = set()
    for start, end in data_clusters + zero_clusters:
        regions.update(range(start // L2_ENTRIES, (end - 1) // L2_ENTRIES + 1))
    l2_of = {region: i for i, region in enumerate(sorted(regions))}

    l1_size = _ceil(virtual_size, REGION_SIZE)
    l1_clusters = _ceil(l1_size * 8, CLUSTER_SIZE)
    n_data = sum(end - start for start, end in data_clusters)
    fixed = 1 + l1_clusters + len(regions) + n_data
    # The refcount blocks count themselves and the refcount table: grow both until they cover the whole file
    # (monotone from below, so this stops at the smallest sizes that do).
    blocks, table = 1, 1
    while True:
        total = fixed + table + blocks
        need_blocks = _ceil(total, REFCOUNTS_PER_BLOCK)
        need_table = _ceil(need_blocks, REFTABLE_ENTRIES)
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = need_blocks, need_table
    if total > MAX_HOST_CLUSTERS:
        raise ValueError(f"a file of {total} clusters is beyond what qcow2 can address")

    l1_at = 1
    table_at = l1_at + l1_clusters
    blocks_at = table_at + table
    l2_at = blocks_at + blocks
    data_at = l2_at + len(regions)

    # An anonymous map rather than a bytearray: its pages start out as zeros without a clearing pass over
    # what, for 1 TiB of data, is 160 MiB of metadata (mostly L2 tables) that gets written right after.
    with mmap.mmap(-1, data_at * CLUSTER_SIZE) as buf:
        head = _header_cluster(virtual_size, backing, backing_format, l1_size, l1_at * CLUSTER_SIZE,
                               table_at * CLUSTER_SIZE, table)
        buf[:len(head)] = head

        l1 = array("Q", bytes(8 * l1_size))
        for region, i in l2_of.items():
            l1[region] = COPIED | (l2_at + i) * CLUSTER_SIZE
        l1_bytes = _be64(l1)
        buf[l1_at * CLUSTER_SIZE:l1_at * CLUSTER_SIZE + len(l1_bytes)] = l1_bytes

        reftable = _be64(array("Q", range(blocks_at * CLUSTER_SIZE, l2_at * CLUSTER_SIZE, CLUSTER_SIZE)))
        buf[table_at * CLUSTER_SIZE:table_at * CLUSTER_SIZE + len(reftable)] = reftable
        # Every cluster of the file is used exactly once; refcounts past the end of the file stay 0.
        buf[blocks_at * CLUSTER_SIZE:blocks_at * CLUSTER_SIZE + 2 * total] = b"\x00\x01" * total

        def entry_pos(region: int, cluster: int) -> int:
            return (l2_at + l2_of[region]) * CLUSTER_SIZE + 8 * (cluster % L2_ENTRIES)

        for start, end in zero_clusters:
            for region, first, count in _split_regions(start, end):
                pos = entry_pos(region, first)
                buf[pos + 7:pos + 8 * count:8] = bytes([ZERO_FLAG]) * count  # and no host offset
        host = data_at
        for start, end in data_clusters:
            for region, first, count in _split_regions(start, end):
                _put_data_entries(buf, entry_pos(region, first), host, count)
                host += count
        metadata = buf[:]

    runs = tuple((start * CLUSTER_SIZE, (end - start) * CLUSTER_SIZE) for start, end in data_clusters)
    return Layout(metadata, runs)
