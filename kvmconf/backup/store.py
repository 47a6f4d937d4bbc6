"""The backup directory of one VM: restore points, their manifests and checksums, and chains.

Layout (the same locally and on the NAS)::

    <dir>/<vm>/<TS>/manifest.json   what this restore point holds (written last: no manifest, no point)
    <dir>/<vm>/<TS>/XXH128SUMS      XXH3-128 checksums: `xxhsum -c XXH128SUMS` (Debian package xxhash)
                                    checks by hand (points of kvmconf before 2026-11-22: B3SUMS, `b3sum -c`)
    <dir>/<vm>/<TS>/<dev>.qcow2     one thin qcow2 per disk; an incremental's backing file is
                                    ../<parent TS>/<dev>.qcow2 (relative, so a copied tree still reads)
    <dir>/<vm>/<TS>.partial/        a run in progress, or a point being removed (what an interrupted
                                    one leaves, recovery removes); only <TS> names a point
    <dir>/<vm>/journal.json         what the running (or interrupted) run has started
    <dir>/<vm>/last-run.json        the outcome of the last run, for backup-status
    <dir>/<vm>/durable.json         the newest point known to be on disk (durability.py)
    <dir>/<vm>/.lock                the per-VM lock a backup or restore holds (flock: journal.vm_lock)
    <dir>/<vm>/replaced.json        disks an in-place restore replaced, kept until the restored VM runs
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
import xxhash

from generators.files import fsync_path, write_new
from kvmconf.errors import KvmconfError

MANIFEST = "manifest.json"
PARTIAL = ".partial"
# Only a directory named like a point's time is one: a damaged point renamed to anything else is out of the way.
POINT_NAME = re.compile(r"\d{8}T\d{6}Z")
TIME_FORMAT = "%Y%m%dT%H%M%SZ"  # a point's time, in UTC, which is its name: names sort as times do
# New points use XXH3-128, rsync's default file checksum: made to catch corruption, which is what these
# checksums are for (anyone who can change a backup can change the manifest beside it). It costs
# 0.09 CPU-s per GiB here, BLAKE3 0.22: a backup shares two CPUs with QEMU's NBD server.
CHECKSUM = "xxh128"
SUMS = {"xxh128": "XXH128SUMS", "blake3": "B3SUMS"}  # per algorithm; BLAKE3 points are from before 2026-11-22


@dataclass(frozen=True)
class DiskFile:
    dev: str
    source: str  # the VM's disk at backup time
    format: str  # the VM disk's format (qcow2, raw): what a restore writes back
    file: str  # name inside the point's directory
    virtual_size: int
    stored: int  # bytes this file occupies (thin: only written clusters)
    checksum: str  # of the file: "<algorithm>:<hex digest>", the algorithm one of SUMS
    backing: str | None  # relative backing file (incrementals), None for a self-contained file

    @property
    def algorithm(self) -> str:
        return self.checksum.partition(":")[0]

    @property
    def digest(self) -> str:
        return self.checksum.partition(":")[2]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskFile:
        if "blake3" in data:  # written before the checksum named its algorithm
            data = {**data, "checksum": "blake3:" + data["blake3"]}
            del data["blake3"]
        return cls(**data)


@dataclass(frozen=True)
class Manifest:
    vm: str
    time: str  # the point's name, UTC, e.g. 20261121T023000Z
    kind: str  # full | incremental | offline
    chain: str  # the time of the chain's full (or offline) base
    parent: str | None
    checkpoint: str | None  # libvirt checkpoint this point ends at (None: the next backup must be full)
    frozen: bool
    notes: list[str]
    disks: list[DiskFile]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    boot_id: str = ""  # the host's boot it was written in (durability.py checks points of earlier boots)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["disks"] = [DiskFile.from_dict(d) for d in data["disks"]]
        return cls(**data)

    @property
    def stored(self) -> int:
        return sum(d.stored for d in self.disks)

    @property
    def sums_file(self) -> str:
        """The name of this point's checksum file, for its disks' algorithm."""
        return SUMS[self.disks[0].algorithm] if self.disks else SUMS[CHECKSUM]


class ChainBroken(KvmconfError):
    """A point of a chain is missing: the points built on it cannot be read."""


class ManifestUnreadable(KvmconfError):
    """A point's manifest does not parse: that VM's backups and restores stop until its directory is renamed."""

    def __init__(self, message: str, point: str) -> None:
        super().__init__(message)
        self.point = point  # the point's directory name (its time)


def load_manifest(path: Path) -> Manifest:
    """A point's manifest; one that does not parse (truncated, edited) is this VM's problem, said with its file."""
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError; missing or unknown fields
        raise ManifestUnreadable(f"{path}: the restore point's manifest does not parse ({type(err).__name__}: {err}):"
                                 f" rename {path.parent} to {path.parent}.damaged (any name that is not a point's"
                                 " time) to go on; the points built on it then cannot be restored",
                                 path.parent.name) from None


def new_hash() -> xxhash.xxh3_128:
    """A running checksum of the CHECKSUM algorithm; checksum_text gives what a DiskFile records."""
    return xxhash.xxh3_128()


def checksum_text(running: xxhash.xxh3_128) -> str:
    return f"{CHECKSUM}:{running.hexdigest()}"


def checksum_file(path: Path, algorithm: str = CHECKSUM) -> str:
    """A file's checksum as a DiskFile records it: for files not written by stream.copy, and to verify."""
    if algorithm == "blake3":
        return "blake3:" + str(blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest())
    if algorithm != CHECKSUM:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    running = new_hash()
    with path.open("rb") as f:
        while piece := f.read(8 << 20):
            running.update(piece)
    return checksum_text(running)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def write_point_files(point: Path, manifest: Manifest) -> None:
    """The checksum file and the manifest, on disk with their directory entries before the caller renames `point`."""
    for name, text in ((manifest.sums_file, "".join(f"{d.digest}  {d.file}\n" for d in manifest.disks)),
                       (MANIFEST, manifest.to_json())):
        write_new(point / name, text, flush=True)
    fsync_path(point)


class VmStore:
    """The restore points of one VM under one root (the local backup dir or the NAS)."""

    def __init__(self, root: Path, vm: str) -> None:
        self.root = root
        self.vm = vm
        self.dir = root / vm

    def points(self) -> list[Manifest]:
        """Complete restore points, oldest first (a directory without a manifest is not one).

        backup-status (Nagios) and backup-verify read them without the VM's lock: a point a backup's retention
        renames away between the listing and the read of its manifest is no point any more, not an error.
        """
        if not self.dir.is_dir():
            return []
        found = []
        for child in sorted(self.dir.iterdir()):
            if self.is_point(child.name):
                try:
                    found.append(load_manifest(child / MANIFEST))
                except FileNotFoundError:
                    continue
        return found

    def point_dir(self, time: str) -> Path:
        return self.dir / time

    def is_point(self, time: str) -> bool:
        """Whether a complete restore point of this time is here (moved into place with its manifest)."""
        return POINT_NAME.fullmatch(time) is not None and (self.point_dir(time) / MANIFEST).is_file()

    def partials(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"*{PARTIAL}")) if self.dir.is_dir() else []

    def verify(self, manifest: Manifest) -> list[str]:
        """Problems with one point's files (missing, checksum); empty when it is intact."""
        problems = []
        for disk in manifest.disks:
            path = self.point_dir(manifest.time) / disk.file
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif checksum_file(path, disk.algorithm) != disk.checksum:
                problems.append(f"{path}: checksum mismatch")
        return problems

    def chain_of(self, manifest: Manifest) -> list[Manifest]:
        """The point and every point it depends on, base first; ChainBroken when one of them is missing."""
        points = self.points()
        by_time = {m.time: m for m in points}
        chain = [manifest]
        while chain[0].parent is not None:
            parent = by_time.get(chain[0].parent)
            if parent is None:
                missing = chain[0].parent
                raise ChainBroken(f"{self.vm}: restore point {missing} is missing from {self.dir} (deleted or moved"
                                  " away): the points built on it cannot be restored"
                                  f" ({', '.join(dependents(points, missing))}); restore an earlier point or one of a"
                                  " later chain")
            chain.insert(0, parent)
        return chain

    def chain_intact(self, manifest: Manifest) -> str | None:
        """What is missing for `manifest` to be readable (a point of its chain, a disk file), None when nothing is.

        Cheap (no checksums): for deciding whether a backup may extend this chain.
        """
        try:
            chain = self.chain_of(manifest)
        except ChainBroken as err:
            return str(err)
        for m in chain:
            for disk in m.disks:
                if not (self.point_dir(m.time) / disk.file).is_file():
                    return f"{self.vm}: {self.point_dir(m.time) / disk.file} is missing"
        return None

    def prune(self, keep: int, log: Callable[[str], None], label: str = "retention") -> None:
        """Delete whole expired chains, newest point first, so a crash midway never leaves an orphaned overlay."""
        points = self.points()
        grouped = chains(points)
        for chain in expired_chains(points, keep):
            for m in reversed(grouped[chain]):
                self.remove_point(m.time)
            log(f"{self.vm}: {label}: removed the chain starting {chain} (keep={keep})")

    def remove_point(self, time: str) -> None:
        """Remove a point: first renamed to a partial one (no half point then looks whole, and the next run's
        recovery, or the NAS stage's, removes what an interrupted or failed removal leaves), then deleted."""
        point = self.point_dir(time)
        if not point.is_dir():
            return
        doomed = self.dir / (time + PARTIAL)
        if doomed.exists():  # left by a removal that failed: it goes first, or the rename below cannot
            shutil.rmtree(doomed, onerror=_with_full_path)
        point.rename(doomed)
        fsync_path(self.dir)
        shutil.rmtree(doomed, onerror=_with_full_path)


def _with_full_path(_function: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
    """rmtree's errors name the file as its directory's entry (it works through file descriptors): the full path
    tells the admin which point it is in."""
    err = exc_info[1]
    if isinstance(err, OSError):
        raise OSError(err.errno, err.strerror, path) from None
    raise err


def utc_now() -> str:
    """Now, as a point's time is written (also in the journal and the last-run record)."""
    return dt.datetime.now(dt.UTC).strftime(TIME_FORMAT)


def parse_time(time: str) -> dt.datetime:
    """A point's time (its name) as a datetime; ValueError for a name that is not one."""
    return dt.datetime.strptime(time, TIME_FORMAT).replace(tzinfo=dt.UTC)


def chains(points: list[Manifest]) -> dict[str, list[Manifest]]:
    grouped: dict[str, list[Manifest]] = {}
    for m in points:
        grouped.setdefault(m.chain, []).append(m)
    return grouped


def dependents(points: list[Manifest], time: str) -> list[str]:
    """The points built on the point `time`, directly or through others, oldest first (`points`: oldest first)."""
    needing = {time}
    for m in points:
        if m.parent in needing:
            needing.add(m.time)
    return sorted(needing - {time})


def expired_chains(points: list[Manifest], keep: int) -> list[str]:
    """The chains to delete so that the newest `keep` points stay restorable.

    Only whole chains go: a chain holding any of the newest `keep` points is kept entirely (its base is
    in use), so there may be more than `keep` points for a while, never fewer. `keep` below 1 is an error:
    it would delete every chain, the newest point's too.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the newest point is always kept), not {keep}")
    kept = {m.chain for m in points[-keep:]}
    return sorted(c for c in chains(points) if c not in kept)
