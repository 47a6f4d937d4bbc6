"""Restore points are not flushed as they are written; this module keeps that safe.

A running VM's point has its data written with direct I/O where the filesystem has it (stream.py says why):
the data is on the disk when the run ends, but the file's block map may not be, nor what the disk holds in
its own write cache; elsewhere the data goes through the page cache. Only the manifest and checksum file are
flushed, and the manifest names the boot of the host it was written in. Points newer than the "durable
through" mark of the VM's directory may not be on disk yet. Before anything older is deleted, and at the
start of every run, they are settled:

- written in this boot: nothing to fear while the host stays up (what is not on the disk yet is in its
  memory), so a run only flushes them (fsync) when it is about to delete older points: cheap by then,
  since the kernel writes dirty pages back within seconds, and paid only when something depends on it;
- written in an earlier boot: the host went down in between, perhaps before the files reached the
  disk. Each is verified against its checksums; one that fails is removed together with the points
  built on it, so the next backup starts a new chain rather than building on lost data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from generators.files import fsync_path
from kvmconf.backup import journal
from kvmconf.backup.store import Manifest, VmStore

DURABLE = "durable.json"  # {"through": the newest point known to be on disk}
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    return _BOOT_ID.read_text().strip()


def settle(store: VmStore, log: Callable[[str], None], flush: bool = True) -> list[str]:
    """Verify the unsettled points of earlier boots; flush this boot's too if `flush`. Notes for the run."""
    notes = []
    try:
        mark = journal.read(store.dir, DURABLE) if store.dir.is_dir() else None
    except journal.Unreadable as err:  # no point is known to be on disk: those of earlier boots are verified
        notes.append(f"{err}: every point is settled again")
        mark = None
    through = "" if mark is None else str(mark.get("through", ""))
    points = store.points()
    unsettled = [m for m in points if m.time > through]
    earlier_boot = [m for m in unsettled if m.boot_id != boot_id()]
    if earlier_boot or (flush and unsettled):
        notes += _verify(store, points, earlier_boot) if earlier_boot else []
        if flush:
            for manifest in unsettled:
                _fsync_files(store, manifest)
        kept = [m for m in store.points() if m.time > through]
        if flush or all(m.boot_id != boot_id() for m in kept):
            newest = max((m.time for m in kept), default=through)
            if newest != through:
                journal.write(store.dir, {"through": newest}, DURABLE)
    for note in notes:
        log(f"{store.vm}: {note}")
    return notes


def _verify(store: VmStore, points: list[Manifest], suspects: list[Manifest]) -> list[str]:
    notes = []
    removed: set[str] = set()
    for manifest in suspects:
        problems = [] if manifest.time in removed else store.verify(manifest)
        if not problems:
            continue
        lost = [m for m in points if m.chain == manifest.chain and m.time >= manifest.time]
        for m in sorted(lost, key=lambda m: m.time, reverse=True):  # newest first: no orphaned overlay
            store.remove_point(m.time)
            removed.add(m.time)
        notes.append(f"restore point {manifest.time} did not reach the disk before the host went down"
                     f" ({'; '.join(problems)}): removed it and the {len(lost) - 1} point(s) built on it;"
                     " the next backup starts a new chain")
    return notes


def _fsync_files(store: VmStore, manifest: Manifest) -> None:
    point = store.point_dir(manifest.time)
    for disk in manifest.disks:  # the manifest and the checksum file were flushed when the point was made
        if (point / disk.file).is_file():
            fsync_path(point / disk.file)
