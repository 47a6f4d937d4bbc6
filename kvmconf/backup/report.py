"""`invoke backup-status` and the Nagios check: last good backup per VM, its age against the schedule."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from kvmconf.backup import journal, verify
from kvmconf.backup.nas import NasFailed, check_mounted
from kvmconf.backup.store import ChainBroken, Manifest, VmStore, parse_time
from kvmconf.errors import KvmconfError


@dataclass(frozen=True)
class VmStatus:
    vm: str
    last_good: str | None
    age: dt.timedelta | None
    chain_length: int
    points: int
    stored: int
    nas_points: int
    last_error: str
    unreadable: str = ""  # why this VM's backups could not be read (a manifest that does not parse): CRITICAL
    damaged: tuple[str, ...] = ()  # points the last backup-verify found damaged (still there): WARNING
    newest_damaged: bool = False  # one of them is in the newest point's chain, which cannot be restored: CRITICAL
    newest_broken: str = ""  # the point the newest point's chain lacks (deleted by hand): CRITICAL
    nas_damaged: tuple[str, ...] = ()  # NAS copies backup-verify found damaged (the next NAS stage redoes them)


def vm_status(root: Path, nas: Path | None, vm: str, now: dt.datetime) -> VmStatus:
    """One VM's status; backups it cannot read are its own problem, not the end of the report of every VM."""
    try:
        return _vm_status(root, nas, vm, now)
    except KvmconfError as err:
        return VmStatus(vm, None, None, 0, 0, 0, 0, "", unreadable=str(err))


def backup_dir_missing(root: Path) -> str:
    """Why no VM's backups can be read here, or "": a missing [backup] dir (its disk not mounted, a host not set up)."""
    if root.is_dir():
        return ""
    return f"the [backup] dir {root} does not exist (is its filesystem mounted?): `fab kvm-setup` creates it"


def _vm_status(root: Path, nas: Path | None, vm: str, now: dt.datetime) -> VmStatus:
    missing = backup_dir_missing(root)
    if missing:  # not "no backup yet": the backups may well be there, on a disk that is not mounted
        raise KvmconfError(missing)
    store = VmStore(root, vm)
    points = store.points()
    last = points[-1] if points else None
    try:
        run = journal.read(store.dir, journal.LAST_RUN) if store.dir.is_dir() else None
    except ValueError as err:  # written whole by a rename, so only damage truncates it: the points still count
        # journal.read's own error (a KvmconfError) names the file already; a bare JSON error does not
        said = str(err) if isinstance(err, KvmconfError) else f"{store.dir / journal.LAST_RUN} does not parse ({err})"
        error = f"{said}: the next run replaces it"
    else:
        # Also when the point was made: a failed NAS copy leaves ok=true and the error (the run exits 1).
        error = "" if run is None or not run.get("error") else f"{run.get('time')}: {run.get('error')}"
    nas_store = _nas_store(root, nas, vm)
    return VmStatus(vm, last.time if last else None, now - parse_time(last.time) if last else None,
                    sum(1 for m in points if last and m.chain == last.chain), len(points),
                    sum(m.stored for m in points), len(nas_store.points()) if nas_store else 0, error,
                    damaged=tuple(sorted(verify.damaged_points(store))),
                    newest_damaged=last is not None and bool(verify.damaged_in_chain(store, last)),
                    newest_broken=_broken(store, last),
                    nas_damaged=tuple(sorted(verify.damaged_points(nas_store))) if nas_store else ())


def _broken(store: VmStore, last: Manifest | None) -> str:
    """The point the newest point's chain lacks, or "": its age alone would call a point that cannot be restored
    good. (A disk file missing from a point is backup-verify's to find: its record makes it critical.)"""
    try:
        if last is not None:
            store.chain_of(last)
    except ChainBroken as err:
        return str(err).removeprefix(f"{store.vm}: ")
    return ""


def _nas_store(root: Path, nas: Path | None, vm: str) -> VmStore | None:
    """The VM's copies on the NAS; None while the share is not mounted (what is there is on the wrong filesystem)."""
    if nas is None:
        return None
    try:
        check_mounted(root, nas)
    except (NasFailed, OSError):  # OSError: no [backup] dir yet
        return None
    return VmStore(nas, vm)


# A clock stepped back (or a point's name from a host whose clock ran ahead) makes the newest point look newer than
# now: its age says nothing about whether backups still run. Beyond this slack it is a problem, not an age.
CLOCK_SLACK = dt.timedelta(minutes=1)
FUTURE = "newest point is in the future: check the clock"


def in_the_future(row: VmStatus) -> bool:
    return row.age is not None and row.age < -CLOCK_SLACK


def _damaged(row: VmStatus) -> str:
    return f"backup-verify found damaged points: {', '.join(row.damaged)}"


def _nas_damaged(row: VmStatus) -> str:
    return (f"backup-verify found damaged NAS copies: {', '.join(row.nas_damaged)} (the next backup's NAS stage"
            " copies them again)")


def _critical(row: VmStatus) -> str:
    """The VM's problem, with its last run's failure if any: most often why its backups stopped, what the admin
    the check wakes needs first."""
    if row.unreadable:
        return _one_line(row.unreadable)
    problem = _critical_problem(row)
    return f"{problem}, last run failed ({_one_line(row.last_error)})" if row.last_error else problem


def _critical_problem(row: VmStatus) -> str:
    if row.newest_damaged:
        return f"the newest point {row.last_good} cannot be restored ({_damaged(row)})"
    if row.newest_broken:
        return _cannot_be_restored(row)
    if row.age is None:
        return "no backup"
    if in_the_future(row):
        return f"last good {row.last_good}, {FUTURE}"
    return f"last good {row.last_good}, {_age(row.age)} old"


def _cannot_be_restored(row: VmStatus) -> str:
    return f"the newest point {row.last_good} cannot be restored ({row.newest_broken})"


def _age(age: dt.timedelta | None) -> str:
    if age is None:
        return "-"
    hours = age.total_seconds() / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"


def _size(stored: int, points: int) -> str:
    """What the points occupy, "-" when there are none: a VM never backed up has no size, not 0.0."""
    if not points:
        return "-"
    return f"{stored / 2**20:.1f} MiB" if stored < 2**30 else f"{stored / 2**30:.1f} GiB"


def format_table(rows: list[VmStatus], limit: dt.timedelta) -> str:
    lines = [f"{'VM':<16} {'LAST GOOD':<17} {'AGE':>8} {'CHAIN':>5} {'POINTS':>6} {'STORED':>10} {'NAS':>4}  PROBLEM"]
    for r in rows:
        problem = r.last_error
        if r.unreadable:
            problem = r.unreadable
        elif r.age is None:
            problem = problem or "no backup yet"
        elif in_the_future(r):
            problem = "; ".join(p for p in (FUTURE, problem) if p)
        elif r.age > limit:
            problem = "; ".join(p for p in (f"older than the schedule allows ({_age(limit)})", problem) if p)
        if r.damaged:
            problem = "; ".join(p for p in (_damaged(r), problem) if p)
        if r.nas_damaged:
            problem = "; ".join(p for p in (problem, _nas_damaged(r)) if p)
        if r.newest_broken:
            problem = "; ".join(p for p in (_cannot_be_restored(r), problem) if p)
        lines.append(f"{r.vm:<16} {r.last_good or '-':<17} {_age(r.age):>8} {r.chain_length:>5} {r.points:>6}"
                     f" {_size(r.stored, r.points):>10} {r.nas_points:>4}  {problem}".rstrip())
    return "\n".join(lines)


def nagios(rows: list[VmStatus], limit: dt.timedelta) -> tuple[int, str]:
    """Nagios plugin result: 0 OK, 1 WARNING (last run failed but a recent point exists, or backup-verify found
    damage in an older chain or in NAS copies), 2 CRITICAL (no recent point, or the newest cannot be restored:
    damaged, or a point of its chain missing).

    A CRITICAL line still lists the WARNINGs: the admin fixing one VM must not miss another's failing runs.
    """
    critical = [r for r in rows if r.unreadable or r.newest_damaged or r.newest_broken
                or r.age is None or r.age > limit or in_the_future(r)]
    warnings = "; ".join([f"{r.vm}: last run failed ({_one_line(r.last_error)})" for r in rows
                          if r.last_error and r not in critical]
                         + [f"{r.vm}: {_damaged(r)}" for r in rows if r.damaged and r not in critical]
                         + [f"{r.vm}: {_nas_damaged(r)}" for r in rows if r.nas_damaged])
    if critical:
        return 2, ("BACKUP CRITICAL - " + _grouped(critical) + f" (limit {_age(limit)})"
                   + (f"; also WARNING - {warnings}" if warnings else ""))
    if warnings:
        return 1, "BACKUP WARNING - " + warnings
    if not rows:
        return 0, "BACKUP OK - no VM to check (none with backup=yes has its host on this machine)"
    return 0, "BACKUP OK - " + ", ".join(f"{r.vm} {_age(r.age)}" for r in rows)


def perfdata(rows: list[VmStatus], limit: dt.timedelta) -> str:
    """Nagios performance data, for graphs and trends: per VM the newest point's age (critical at `limit`),
    what its points occupy and its chain's length. A VM without a point has no age: "U", undetermined."""
    critical = int(limit.total_seconds())
    values = []
    for r in rows:
        age = "U" if r.age is None or r.unreadable else f"{max(0, int(r.age.total_seconds()))}s"
        values += [f"{r.vm}_age={age};;{critical};0", f"{r.vm}_stored={r.stored}B;;;0",
                   f"{r.vm}_chain={r.chain_length};;;0"]
    return " ".join(values)


def _one_line(text: str) -> str:
    """An error message on one line, without the line break that often ends it: libvirt's errors carry QEMU's
    stderr, and a ConfigError has a line per problem."""
    return " ".join(text.split())


def plugin_output(text: str, perf: str) -> str:
    """The check's one line: Nagios takes everything after the first "|" as performance data, so a "|" in the
    text (from an error message) is shown as a broken bar instead; and it takes only the first line as the status
    (the rest is long output, perfdata included), so line breaks become spaces."""
    text = _one_line(text).replace("|", "\u00a6")
    return f"{text} | {perf}" if perf else text


def _grouped(critical: list[VmStatus]) -> str:
    """The CRITICAL VMs, those with the same problem (a missing [backup] dir: every VM) together, in order."""
    by_problem: dict[str, list[str]] = {}
    for row in critical:
        by_problem.setdefault(_critical(row), []).append(row.vm)
    return "; ".join(f"{', '.join(vms)}: {problem}" for problem, vms in by_problem.items())
