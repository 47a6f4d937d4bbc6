"""The one-pass qcow2 planner/writer: stock qemu-img must read what it writes, exactly as planned.

The expected image is computed independently of the planner: a per-cluster model of which clusters hold
data (those the data ranges touch, and those the zero ranges cover only in part) and which read as zero (those
the zero ranges cover whole), applied to a raw image built from the same read() function, then
`qemu-img compare` and `qemu-img map` check the real file against it.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmconf.backup.qcow2 import CLUSTER_SIZE, Layout, plan
from tests.tools import require_tool, run

C = CLUSTER_SIZE
MiB = 1 << 20
GiB = 1 << 30
Ranges = Sequence[tuple[int, int]]
Read = Callable[[int, int], bytes]


# --- an oracle that does not share the planner's interval code ----------------------------------------------

def data_clusters(data: Ranges) -> set[int]:
    return {c for off, length in data if length for c in range(off // C, (off + length + C - 1) // C)}


def _zero_bytes_per_cluster(zero: Ranges, virtual_size: int) -> dict[int, int]:
    """For each cluster a zero range touches: how many of its bytes (up to the end of the disk) the ranges cover."""
    pieces: dict[int, list[tuple[int, int]]] = {}
    for off, length in zero:
        for c in range(off // C, (off + length + C - 1) // C) if length else ():
            pieces.setdefault(c, []).append((max(off, c * C), min(off + length, (c + 1) * C)))
    covered = {}
    for c, spans in pieces.items():
        bytes_in = 0
        reached = c * C
        for start, end in sorted(spans):
            start = max(start, reached)
            if end > start:
                bytes_in += end - start
                reached = end
        covered[c] = bytes_in
    return covered


def zero_clusters(zero: Ranges, virtual_size: int) -> set[int]:
    """Clusters the zero ranges cover together, whole; the bytes past the end of the disk do not count."""
    return {c for c, n in _zero_bytes_per_cluster(zero, virtual_size).items() if n == min(C, virtual_size - c * C)}


def stored_clusters(data: Ranges, zero: Ranges, virtual_size: int) -> set[int]:
    """What the file stores: every cluster data touches, and those zero ranges cover only in part (a zero flag
    can only make a whole cluster read as zeros: the rest of such a cluster comes from the source)."""
    partial = set(_zero_bytes_per_cluster(zero, virtual_size)) - zero_clusters(zero, virtual_size)
    return data_clusters(data) | partial


def sectors(virtual_size: int) -> int:
    """The size qemu sees: whole 512-byte sectors (the planner rounds the header's size up the same way)."""
    return (virtual_size + 511) // 512 * 512


def reference(path: Path, virtual_size: int, read: Read, data: Ranges, zero: Ranges = (),
              base: bytes | None = None) -> None:
    """The raw image our file must read as: base (or zeros), zeroed clusters, then data clusters from read().

    The tail of a partial last sector belongs to the disk for qemu: zeros in data clusters (nothing to read
    there), the backing file's bytes elsewhere.
    """
    size = sectors(virtual_size)
    with open(path, "wb") as f:
        f.truncate(size)
        if base is not None:
            f.write(base[:size])
        stored = stored_clusters(data, zero, virtual_size)
        for c in sorted(zero_clusters(zero, virtual_size) - stored):
            f.seek(c * C)
            f.write(bytes(min(C, size - c * C)))
        for c in sorted(stored):
            f.seek(c * C)
            f.write(read(c * C, min(C, virtual_size - c * C)).ljust(min(C, size - c * C), b"\0"))


def extents(clusters: set[int], virtual_size: int) -> list[tuple[int, int]]:
    """Merged guest (start, length) extents of a cluster set, clipped to the disk, as `qemu-img map` lists them."""
    out: list[tuple[int, int]] = []
    for c in sorted(clusters):
        if out and out[-1][0] + out[-1][1] == c * C:
            out[-1] = (out[-1][0], out[-1][1] + C)
        else:
            out.append((c * C, C))
    return [(s, min(length, sectors(virtual_size) - s)) for s, length in out]


def random_read(size: int, seed: int = 1) -> Read:
    content = random.Random(seed).randbytes(size)
    return lambda off, length: content[off:off + length]


def pattern_read(virtual_size: int) -> Read:
    """Cheap content for big sparse disks: every 8 bytes hold their own guest offset (never all zeros)."""
    def read(off: int, length: int) -> bytes:
        length = min(length, virtual_size - off)  # like a real disk: nothing past its end
        first = off - off % 8
        raw = b"".join(struct.pack(">Q", x + 1) for x in range(first, off + length, 8))
        return raw[off - first:off - first + length]
    return read


# --- writing a plan: the backups write theirs with stream.copy, hashing as they go ------------------------------

WRITE_CHUNK = 8 << 20


def write(path: Path, layout: Layout, read: Read) -> None:
    """Write the whole file front to back, the plain way: what plan() promises, without stream.copy's NBD
    reads, hashing and parallel writes. read(offset, length) returns guest bytes (length may be clamped by the
    caller's own size; short reads are padded with zeros to the run length).

    read() is never asked for bytes past the end of the disk's last sector (Layout.virtual_size); the rest of
    the last cluster is zeros. All-zero chunks are skipped with a seek rather than written, so the file stays
    sparse; the final truncate gives it its full size even when it ends in such a hole.
    """
    disk_end = layout.virtual_size
    with open(path, "wb") as f:
        f.write(layout.metadata)
        for offset, length in layout.runs:
            done = 0
            while done < length:
                want = min(WRITE_CHUNK, length - done)
                inside = min(want, disk_end - offset - done)  # <= 0 only in the padding of the last cluster
                inside = max(inside, 0)
                chunk = read(offset + done, inside) if inside else b""
                if len(chunk) > inside:
                    raise ValueError(f"read({offset + done}, {inside}) returned {len(chunk)} bytes")
                if chunk.count(0) == len(chunk):
                    f.seek(want, os.SEEK_CUR)
                else:
                    f.write(chunk)
                    f.seek(want - len(chunk), os.SEEK_CUR)  # the zero padding of a short read
                done += want
        f.truncate(layout.file_size)


# --- qemu-img ---------------------------------------------------------------------------------------------------

def qemu(*args: str | Path, cwd: Path | None = None) -> str:
    r = run([require_tool(str(args[0])), *map(str, args[1:])], cwd=cwd)
    assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return r.stdout


def assert_clean(path: Path, layout: Layout) -> None:
    report = json.loads(qemu("qemu-img", "check", "--output=json", path))
    assert report["check-errors"] == 0, report
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    assert report["image-end-offset"] == layout.file_size == path.stat().st_size


def assert_same(ours: Path, raw: Path) -> None:
    out = qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ours, raw)
    assert "Images are identical" in out


def info(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(qemu("qemu-img", "info", "--output=json", path))
    return result


def mapped(path: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(qemu("qemu-img", "map", "--output=json", path))
    return result


def assert_map(path: Path, layout: Layout, virtual_size: int, data: Ranges, zero: Ranges = ()) -> None:
    """Top-layer data exactly on the planned clusters at the planned host offsets, zero flags exactly where asked."""
    entries = mapped(path)
    got: list[tuple[int, int, int]] = []
    for e in entries:
        if e["depth"] == 0 and e["data"]:
            if got and got[-1][0] + got[-1][1] == e["start"] and got[-1][2] + got[-1][1] == e["offset"]:
                # qemu splits where the host file has holes (zero: true); the mapping is still one extent
                got[-1] = (got[-1][0], got[-1][1] + e["length"], got[-1][2])
            else:
                got.append((e["start"], e["length"], e["offset"]))
    want = []
    host = layout.data_offset
    stored = stored_clusters(data, zero, virtual_size)
    for start, length in extents(stored, virtual_size):
        want.append((start, length, host))
        host += (length + C - 1) // C * C
    assert got == want
    flagged = [(e["start"], e["length"]) for e in entries if e["depth"] == 0 and e["present"] and not e["data"]]
    assert flagged == extents(zero_clusters(zero, virtual_size) - stored, virtual_size)


def make_base(directory: Path, size: str, writes: Sequence[tuple[int, int, int]]) -> bytes:
    """base.qcow2 made by qemu itself, and the bytes it holds."""
    qemu("qemu-img", "create", "-f", "qcow2", directory / "base.qcow2", size)
    args: list[str] = []
    for value, off, length in writes:
        args += ["-c", f"write -P {value:#x} {off} {length}"]
    qemu("qemu-io", "-f", "qcow2", *args, directory / "base.qcow2")
    content = bytearray(int(info(directory / "base.qcow2")["virtual-size"]))
    for value, off, length in writes:
        content[off:off + length] = bytes([value]) * length
    return bytes(content)


# --- metadata parsing (for plans too big to write) -------------------------------------------------------------

HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")


def header(meta: bytes) -> dict[str, int]:
    names = ["magic", "version", "backing_offset", "backing_size", "cluster_bits", "size", "crypt", "l1_size",
             "l1_offset", "reftable_offset", "reftable_clusters", "nb_snapshots", "snapshots_offset", "incompatible",
             "compatible", "autoclear", "refcount_order", "header_length"]
    return dict(zip(names, HEADER.unpack_from(meta), strict=True))


def u64(meta: bytes, offset: int) -> int:
    value: int = struct.unpack_from(">Q", meta, offset)[0]
    return value


def l2_entry(meta: bytes, cluster: int) -> int:
    h = header(meta)
    l1 = u64(meta, h["l1_offset"] + 8 * (cluster // 8192))
    assert l1 >> 63 == 1, "L1 entry of a used region must carry COPIED"
    return u64(meta, (l1 & ((1 << 56) - 1)) + 8 * (cluster % 8192))


# --- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.consumer
def test_full_image_with_odd_ranges_reads_back_exactly(tmp_path: Path) -> None:
    virtual_size = 20 * MiB + 12345
    read = random_read(virtual_size)
    data = [(10 * MiB + 3, 2 * MiB), (3 * C + 100, 5000), (MiB + 7, 300000), (3 * C, 10),
            (11 * MiB, 5), (19 * MiB + 999, 4321), (2 * MiB - 1, 2)]  # unsorted, overlapping, unaligned
    layout = plan(virtual_size, data)
    assert layout.runs == ((3 * C, C), (16 * C, 5 * C), (31 * C, 2 * C), (160 * C, 33 * C), (304 * C, C))
    ours, raw = tmp_path / "full.qcow2", tmp_path / "ref.raw"
    write(ours, layout, read)
    reference(raw, virtual_size, read, data)

    assert_clean(ours, layout)
    assert_same(ours, raw)
    i = info(ours)
    # qemu counts whole 512-byte sectors: the size is rounded up like `qemu-img create` does (12800 is 12345 up)
    assert (i["format"], i["virtual-size"], i["format-specific"]["data"]["compat"]) == (
        "qcow2", 20 * MiB + 12800, "1.1")
    assert i["cluster-size"] == C and i["format-specific"]["data"]["refcount-bits"] == 16
    assert "backing-filename" not in i
    assert_map(ours, layout, virtual_size, data)
    # Thin: the file holds metadata and the 42 data clusters, nothing of the 20 MiB disk's empty space.
    assert layout.file_size == layout.data_offset + 42 * C
    assert ours.stat().st_blocks * 512 <= layout.file_size + C
    assert layout.file_size < virtual_size // 5


@pytest.mark.consumer
def test_overlay_stores_data_and_zero_flags_over_its_backing_file(tmp_path: Path) -> None:
    base = make_base(tmp_path, "16M", [(0x11, 0, 4 * MiB), (0x22, 8 * MiB, 4 * MiB), (0x33, 14 * MiB, 2 * MiB)])
    virtual_size = 16 * MiB - 1024  # a partial last cluster, over a base that has data there
    read = random_read(virtual_size, seed=2)
    data = [(MiB + 5, 100), (9 * MiB, 300000), (15 * MiB, 2 * C)]
    # Whole clusters read as zeros; the partial clusters at the edges are stored from the source (they must not
    # keep the base's bytes); the range reaching the end of the disk takes its last, partial cluster; data at
    # 15 MiB wins over the zero range around it. The two ranges at 5 MiB share a cluster and cover it together.
    zero = [(2 * MiB + 1000, MiB), (10 * MiB, 2 * MiB - 12345), (13 * MiB, 3 * MiB - 1024), (5 * MiB, 10),
            (6 * MiB, C // 2), (6 * MiB + C // 2, C // 2)]
    layout = plan(virtual_size, data, zero, backing="base.qcow2")
    ours, raw = tmp_path / "incr.qcow2", tmp_path / "ref.raw"
    write(ours, layout, read)
    reference(raw, virtual_size, read, data, zero, base)

    assert_clean(ours, layout)
    assert_same(ours, raw)
    i = info(ours)
    assert (i["backing-filename"], i["backing-filename-format"]) == ("base.qcow2", "qcow2")
    assert i["full-backing-filename"] == str(tmp_path / "base.qcow2")
    assert_map(ours, layout, virtual_size, data, zero)
    # 8 data clusters and 4 partial zero clusters stored; the zero-flagged clusters take no room.
    assert layout.file_size == layout.data_offset + 12 * C


@pytest.mark.consumer
def test_empty_overlay_reads_as_its_backing_file_and_empty_full_as_zeros(tmp_path: Path) -> None:
    base = make_base(tmp_path, "4M", [(0x5A, C, 3 * MiB)])
    overlay = tmp_path / "empty-incr.qcow2"
    layout = plan(4 * MiB, [], backing="base.qcow2")
    write(overlay, layout, random_read(4 * MiB))
    assert layout.runs == () and layout.file_size == layout.data_offset == 4 * C  # header, L1, reftable, refblock
    assert_clean(overlay, layout)
    qemu("qemu-img", "compare", overlay, tmp_path / "base.qcow2")
    raw = tmp_path / "base.raw"
    raw.write_bytes(base)
    assert_same(overlay, raw)
    assert all(e["depth"] == 1 for e in mapped(overlay))

    full = tmp_path / "empty-full.qcow2"
    layout = plan(10 * MiB + 1, [])
    write(full, layout, random_read(10 * MiB + 1))
    assert_clean(full, layout)
    zeros = tmp_path / "zeros.raw"
    reference(zeros, 10 * MiB + 1, random_read(1), [])
    assert_same(full, zeros)
    assert [e["data"] for e in mapped(full)] == [False]
    assert info(full)["virtual-size"] == 10 * MiB + 512

    nothing = tmp_path / "zero-size.qcow2"  # no L1 entries at all: header, refcount table and block only
    layout = plan(0, [])
    write(nothing, layout, random_read(0))
    assert layout.file_size == 3 * C
    assert_clean(nothing, layout)
    assert info(nothing)["virtual-size"] == 0


@pytest.mark.consumer
def test_data_at_the_very_end_of_an_unaligned_disk(tmp_path: Path) -> None:
    virtual_size = 5 * MiB + 777
    content = random_read(virtual_size, seed=3)

    def read(off: int, length: int) -> bytes:  # the writer never asks past the disk's (last sector's) end
        assert off >= 0 and off + length <= sectors(virtual_size), (off, length)
        return content(off, length)  # clamped to the disk like a real one

    data = [(virtual_size - 10, 10)]
    layout = plan(virtual_size, data)
    assert layout.runs == ((5 * MiB, C),)  # the whole last cluster: the writer pads past the end with zeros
    assert layout.file_size == layout.data_offset + C
    ours, raw = tmp_path / "end.qcow2", tmp_path / "ref.raw"
    write(ours, layout, read)
    reference(raw, virtual_size, read, data)
    assert_clean(ours, layout)
    assert_same(ours, raw)
    assert_map(ours, layout, virtual_size, data)
    pattern = read(5 * MiB, 777)
    with open(ours, "rb") as f:  # the cluster's tail past the disk's end is zeros in the file
        f.seek(layout.data_offset)
        assert f.read(C) == pattern + bytes(C - 777)


@pytest.mark.consumer
def test_several_l2_tables(tmp_path: Path) -> None:
    virtual_size = 2 * GiB + 4097
    data = [(100 * MiB + 3, 200 * 1024), (512 * MiB - 70000, 140000), (1100 * MiB, MiB), (virtual_size - 5, 5)]
    zero = [(1200 * MiB, 3 * MiB)]
    layout = plan(virtual_size, data, zero)
    h = header(layout.metadata)
    assert h["l1_size"] == 5  # 2 GiB + a bit: five 512 MiB regions
    l1 = [u64(layout.metadata, h["l1_offset"] + 8 * i) for i in range(5)]
    assert l1[3] == 0  # 1.5 to 2 GiB holds nothing: no L2 table
    used = [l1[0], l1[1], l1[2], l1[4]]  # a run crosses 512 MiB; the zero range shares region 2 with data
    assert all(e >> 63 for e in used) and len({e & ((1 << 56) - 1) for e in used}) == 4
    ours, raw = tmp_path / "big.qcow2", tmp_path / "ref.raw"
    write(ours, layout, pattern_read(virtual_size))
    reference(raw, virtual_size, pattern_read(virtual_size), data, zero)
    assert_clean(ours, layout)
    assert_same(ours, raw)
    assert_map(ours, layout, virtual_size, data, zero)


def test_two_tib_plan_refcounts_cover_the_file() -> None:
    """1 TiB of data on a 2 TiB disk: 16M data clusters, 512 refcount blocks, 2048 L2 tables, planned at once.

    How long planning takes is measured by bench/qcow2_plan_bench.py, not here: a timed test fails on a busy machine.
    """
    layout = plan(2 << 40, [(0, 512 * GiB), (1 << 40, 512 * GiB - 1)], [(512 * GiB, 4 * MiB)])
    meta = layout.metadata
    h = header(meta)
    assert (h["magic"], h["version"], h["cluster_bits"], h["refcount_order"], h["size"]) == (
        b"QFI\xfb", 3, 16, 4, 2 << 40)
    assert h["l1_size"] == 4096 and h["header_length"] >= 104 and h["incompatible"] == 0
    assert layout.file_size % C == 0 and layout.data_offset == len(meta)
    clusters = layout.file_size // C
    blocks = (clusters + 32767) // 32768
    # header, L1 (4096 entries: one cluster), one refcount table cluster, the blocks, 2049 L2 tables, the data
    assert clusters == 3 + blocks + 2049 + (1 << 24)
    table = [u64(meta, h["reftable_offset"] + 8 * i) for i in range(h["reftable_clusters"] * 8192)]
    used = [e for e in table if e]
    assert len(used) == blocks and table[:blocks] == used  # one pointer per block, the rest of the table 0
    assert used == sorted(used) and all(e % C == 0 and e < layout.data_offset for e in used)
    # Every cluster of the file has refcount 1 (big-endian 16-bit), every cluster past its end 0.
    refcounts = b"".join(meta[e:e + C] for e in used)
    assert refcounts[:2 * clusters] == b"\x00\x01" * clusters
    assert refcounts[2 * clusters:] == bytes(len(refcounts) - 2 * clusters)
    # The refcount table and blocks count themselves: their clusters are within the counted ones.
    assert max(used) // C < clusters and h["reftable_offset"] // C < clusters
    # L2: data clusters in guest order at consecutive host clusters, COPIED; a zero-flagged cluster has no host.
    half = 512 * GiB // C
    first, second = layout.data_offset, layout.data_offset + 512 * GiB
    copied = 1 << 63
    for cluster, host in ((0, first), (8191, first + 8191 * C), (8192, first + 8192 * C),
                          (half - 1, first + (half - 1) * C), ((1 << 40) // C, second),
                          ((1 << 40) // C + half - 1, second + (half - 1) * C)):
        assert l2_entry(meta, cluster) == copied | host, cluster
    # Whole L2 tables where the host cluster number carries into its third and fourth byte.
    data_at, second_guest = layout.data_offset // C, (1 << 40) // C
    for carry in (1 << 16, 1 << 24):
        k = carry - data_at  # index, in file order, of the data cluster stored at host cluster `carry`
        region = (k if k < half else second_guest + k - half) // 8192
        guests = range(region * 8192, region * 8192 + 8192)
        want = [copied | (data_at + (g if g < half else g - second_guest + half)) * C for g in guests]
        assert [l2_entry(meta, g) for g in guests] == want, carry
    assert l2_entry(meta, half) == l2_entry(meta, half + 63) == 1  # the zero range's 64 clusters, flagged
    assert l2_entry(meta, half + 64) == 0
    assert layout.runs == ((0, 512 * GiB), (1 << 40, 512 * GiB))


@pytest.mark.consumer
def test_sparse_file_over_2_gib_uses_two_refcount_blocks(tmp_path: Path) -> None:
    virtual_size = 3 * GiB + 512
    data = [(0, 5 * GiB // 2), (3 * GiB, 512)]
    markers = {0: 0xAB, 2 * GiB + 7 * C: 0xCD, 3 * GiB: 0xEF}

    def read(off: int, length: int) -> bytes:  # zeros (a short read) except whole marker clusters
        hits = [o for o in markers if off <= o < off + length]
        if not hits:
            return b""
        out = bytearray(max(hits) + C - off)
        for o in hits:
            out[o - off:o - off + C] = bytes([markers[o]]) * C
        return bytes(out[:length])

    layout = plan(virtual_size, data)
    h = header(layout.metadata)
    used = [u64(layout.metadata, h["reftable_offset"] + 8 * i) for i in range(8192)]
    assert sum(1 for e in used if e) == 2 and layout.file_size > 2 * GiB
    ours = tmp_path / "sparse.qcow2"
    write(ours, layout, read)
    assert ours.stat().st_size == layout.file_size
    assert ours.stat().st_blocks * 512 <= layout.data_offset + 4 * C + MiB  # holes, not 2.5 GiB of zeros
    assert_clean(ours, layout)
    assert_map(ours, layout, virtual_size, data)
    commands = [f"read -P {value:#x} {off} {min(C, virtual_size - off)}" for off, value in markers.items()]
    commands += [f"read -P 0 {C} {C}", f"read -P 0 {5 * GiB // 2} {C}"]
    out = qemu("qemu-io", "-r", "-f", "qcow2", *[a for c in commands for a in ("-c", c)], ours)
    assert "Pattern verification failed" not in out and out.count("read ") == len(commands)


def refcounts_of(layout: Layout) -> bytes:
    """The refcount entries of all the refcount blocks, in cluster order, found through the header."""
    h = header(layout.metadata)
    table = [u64(layout.metadata, h["reftable_offset"] + 8 * i) for i in range(h["reftable_clusters"] * 8192)]
    return b"".join(layout.metadata[e:e + C] for e in table if e)


def test_refcount_blocks_count_themselves_at_the_block_boundary() -> None:
    """Around 32768 clusters a second refcount block is needed just for the metadata's own clusters."""
    seen = set()
    for n in range(32755, 32772):
        layout = plan(4 * GiB, [(0, n * C)])
        clusters = layout.file_size // C
        refcounts = refcounts_of(layout)
        assert refcounts[:2 * clusters] == b"\x00\x01" * clusters, n
        assert refcounts[2 * clusters:].count(0) == len(refcounts) - 2 * clusters, n
        # the fewest blocks that do: a block more would count clusters past the end of the file
        assert len(refcounts) // C == (clusters + 32767) // 32768, n
        seen.add(len(refcounts) // C)
    assert seen == {1, 2}


@pytest.mark.consumer
@pytest.mark.parametrize(("n", "blocks"), [(32760, 1), (32761, 2)])
def test_qemu_agrees_at_the_refcount_block_boundary(tmp_path: Path, n: int, blocks: int) -> None:
    # header, L1, 4 L2 tables, refcount table and n data clusters: with 32760 one block covers exactly the
    # 32768 clusters; one data cluster more and the second block is needed (and counted) too.
    layout = plan(4 * GiB, [(0, n * C)])
    assert layout.file_size == (n + 7 + blocks) * C and len(refcounts_of(layout)) == blocks * C
    ours = tmp_path / "boundary.qcow2"
    write(ours, layout, lambda off, length: b"")
    assert_clean(ours, layout)


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="backing file name is 1024 bytes long, qemu accepts at most 1023"):
        plan(MiB, [], backing="b" * 1024)
    assert plan(MiB, [], backing="b" * 1023).runs == ()  # the longest name qemu accepts still fits cluster 0
    with pytest.raises(ValueError, match="backing format 'a-very-long-format' must be 1 to 15 bytes long"):
        plan(MiB, [], backing="base", backing_format="a-very-long-format")
    with pytest.raises(ValueError, match=r"data range \(1048000, 1000\) is not within the virtual size 1048576"):
        plan(MiB, [(1048000, 1000)])
    with pytest.raises(ValueError, match=r"zero range \(-1, 10\) is not within"):
        plan(MiB, [], [(-1, 10)])


def test_backing_name_is_in_the_header_cluster() -> None:
    meta = plan(MiB, [], backing="../2026/vda.qcow2", backing_format="raw").metadata
    h = header(meta)
    assert meta[h["backing_offset"]:h["backing_offset"] + h["backing_size"]] == b"../2026/vda.qcow2"
    ext = h["header_length"]
    assert struct.unpack_from(">II", meta, ext) == (0xE2792ACA, 3) and meta[ext + 8:ext + 11] == b"raw"
    assert struct.unpack_from(">II", meta, ext + 16) == (0, 0)  # end of extensions, before the name
    assert h["backing_offset"] == ext + 24


# --- property: random runs over a backing file, checked by qemu ------------------------------------------------

BASE_SIZE = 3 * MiB


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """base.qcow2 and base.raw (its content), shared by the examples."""
    directory = tmp_path_factory.mktemp("qcow2-prop")
    base = make_base(directory, str(BASE_SIZE), [(0x11, 0, MiB), (0x22, 2 * MiB, MiB // 2)])
    (directory / "base.raw").write_bytes(base)
    yield directory


@st.composite
def cases(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]], bool]:
    virtual_size = draw(st.integers(1, BASE_SIZE + 8 * C + 1))  # also bigger than the base: zeros past its end

    def ranges() -> list[tuple[int, int]]:
        out = []
        for _ in range(draw(st.integers(0, 5))):
            off = draw(st.integers(0, virtual_size - 1))
            out.append((off, draw(st.integers(0, min(virtual_size - off, 6 * C)))))
        return out

    return virtual_size, ranges(), ranges(), draw(st.booleans())


@pytest.mark.consumer
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_random_plans_read_back_exactly(base_dir: Path,
                                        case: tuple[int, list[tuple[int, int]], list[tuple[int, int]], bool]) -> None:
    directory = base_dir
    base = (directory / "base.raw").read_bytes()
    virtual_size, data, zero, overlay = case
    read = random_read(virtual_size, seed=virtual_size)
    layout = plan(virtual_size, data, zero, backing="base.qcow2" if overlay else None)
    ours, raw = directory / "prop.qcow2", directory / "prop.raw"
    write(ours, layout, read)
    reference(raw, virtual_size, read, data, zero, base if overlay else None)
    assert_clean(ours, layout)
    assert_same(ours, raw)
    assert os.path.getsize(ours) == layout.data_offset + C * len(stored_clusters(data, zero, virtual_size))
