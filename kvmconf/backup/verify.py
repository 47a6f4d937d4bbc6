"""`invoke backup-verify`: read every restore point back and check it against its checksums.

Otherwise a backup that rotted on disk is found only by the restore that needs it, and later backups go on
extending its chain. Verifying reads every byte of every point, the longest of the backup tasks, so each
point gets its line as it is checked. What fails is recorded in <vm dir>/damaged.json: the next backup reads
it and starts a new chain rather than build on damaged data, and backup-status and the nagios check say it.

It takes no lock: a backup (from cron) must not fail for a verify that runs for an hour. A point that a
backup's retention deleted meanwhile is simply not reported.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from kvmconf.backup import journal
from kvmconf.backup.store import Manifest, ManifestUnreadable, VmStore, dependents

DAMAGED = "damaged.json"  # {"time": when verified, "points": {point time: [problems]}}

Log = Callable[[str], None]


def verify(store: VmStore, now: str, log: Log) -> dict[str, list[str]]:
    """Check every point of `store`; the damaged ones and their problems, also recorded (none: the record goes)."""
    try:
        points = store.points()
    except ManifestUnreadable as err:  # damage too, and this VM's alone: the next VMs are still verified
        log(f"{store.vm}: {err.point}: DAMAGED: {err}")
        return {err.point: [str(err)]}  # not recorded: backup-status says it already, reading the manifest
    if not points:  # a line of its own: the run's "all intact" must not pass for this VM's backups being checked
        log(f"{store.vm}: no restore point in {store.dir}: nothing to verify")
    damaged: dict[str, list[str]] = {}
    for manifest in points:
        problems = store.verify(manifest)
        if problems and not store.is_point(manifest.time):  # deleted by a backup's retention meanwhile
            continue
        if problems:
            damaged[manifest.time] = problems
            log(f"{store.vm}: {manifest.time}: DAMAGED: {'; '.join(problems)}")
        else:
            log(f"{store.vm}: {manifest.time}: ok ({_size(manifest)})")
    for time in sorted(damaged):
        needing = [t for t in dependents(points, time) if t not in damaged]
        if needing:
            log(f"{store.vm}: the points built on {time} cannot be restored either: {', '.join(needing)}")
    record = store.dir / DAMAGED
    try:
        if damaged:
            journal.write(store.dir, {"time": now, "points": damaged}, DAMAGED)
        else:
            record.unlink(missing_ok=True)
    except OSError as err:  # a backup disk remounted read-only after a disk error: what was found is still said
        if damaged or record.exists():  # read-only, unlink fails even where there is no file
            log(f"{store.vm}: cannot record this in {record} ({err.strerror or err}): backup-status and the next"
                " backup go by what it holds until a verify can write it")
    return damaged


def _record(store: VmStore) -> dict[str, Any]:
    """The last verify's record; empty when there is none, or it does not parse (as if never verified: the next
    verify writes it anew)."""
    try:
        return (journal.read(store.dir, DAMAGED) if store.dir.is_dir() else None) or {}
    except journal.Unreadable:
        return {}


def damaged_points(store: VmStore) -> dict[str, list[str]]:
    """The points the last verify found damaged and that are still there, with their problems."""
    points = dict(_record(store).get("points", {}))
    return {time: list(problems) for time, problems in points.items() if store.is_point(time)}


def forget(store: VmStore, times: Collection[str]) -> None:
    """Drop points from the record: their files were replaced by copies verified since (the NAS stage's)."""
    record = _record(store)
    points = dict(record.get("points", {}))
    if not set(points) & set(times):
        return
    left = {time: problems for time, problems in points.items() if time not in times}
    if left:
        journal.write(store.dir, {**record, "points": left}, DAMAGED)
    else:
        (store.dir / DAMAGED).unlink()


def damaged_in_chain(store: VmStore, manifest: Manifest) -> list[str]:
    """The damaged points of `manifest`'s chain (what the next backup of that chain would build on)."""
    chain = {m.time for m in store.points() if m.chain == manifest.chain}
    return sorted(time for time in damaged_points(store) if time in chain)


def _size(manifest: Manifest) -> str:
    return f"{sum(d.stored for d in manifest.disks) / (1 << 20):.1f} MiB"
