"""Restore points are written without waiting for the disk; this module keeps that safe.

A run writes a point's files through the page cache (stream.py says why) and records the point
here, with the boot it was written in, before the manifest makes the point exist. Before a later
run builds on it, and before any older point is deleted, the record is settled:

- same boot: the files are flushed (fsync). By then the kernel has usually written them back, so
  this costs little, and it is paid only when something depends on it;
- another boot: the host went down in between, perhaps before the files reached the disk. Each
  recorded point is verified against its checksums; one that fails is removed together with the
  points built on it, so the next backup starts a new chain rather than building on lost data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvmconf.backup import journal
from kvmconf.backup.store import VmStore, fsync_path

UNFLUSHED = "unflushed.json"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    return _BOOT_ID.read_text().strip()


def record(store: VmStore, point: str) -> None:
    """Note that `point`'s files may not be on disk yet (called before its manifest is written)."""
    entry = journal.read(store.dir, UNFLUSHED)
    points = entry["points"] if entry is not None and entry.get("boot_id") == boot_id() else []
    journal.write(store.dir, {"boot_id": boot_id(), "points": sorted({*points, point})}, UNFLUSHED)


def settle(store: VmStore, log: Callable[[str], None], flush: bool = True) -> list[str]:
    """Verify the recorded points if the host rebooted since; else flush them (if `flush`). Notes for the run.

    Without `flush`, points of this boot stay recorded: building on them is safe while the page cache
    holds them, and a crash before they are flushed is caught by the verification after the reboot.
    """
    entry = journal.read(store.dir, UNFLUSHED)
    if entry is None or (not flush and entry.get("boot_id") == boot_id()):
        return []
    notes = []
    by_time = {m.time: m for m in store.points()}
    recorded = [by_time[t] for t in sorted(entry.get("points", [])) if t in by_time]
    if entry.get("boot_id") == boot_id():
        for manifest in recorded:
            for disk in manifest.disks:
                fsync_path(store.point_dir(manifest.time) / disk.file)
    else:
        removed: set[str] = set()
        for manifest in recorded:
            problems = [] if manifest.time in removed else store.verify(manifest)
            if not problems:
                continue
            lost = [m for m in by_time.values() if m.chain == manifest.chain and m.time >= manifest.time]
            for m in sorted(lost, key=lambda m: m.time, reverse=True):  # newest first: no orphaned overlay
                store.remove_point(m.time)
                removed.add(m.time)
            notes.append(f"restore point {manifest.time} did not reach the disk before the host went down"
                         f" ({'; '.join(problems)}): removed it and the {len(lost) - 1} point(s) built on it;"
                         " the next backup starts a new chain")
    (store.dir / UNFLUSHED).unlink()
    fsync_path(store.dir)
    for note in notes:
        log(f"{store.vm}: {note}")
    return notes
