"""Bring a machine's files and packages to what is wanted, over SSH: shared by deploy (VMs) and kvm-setup (hosts).

Files are compared by owner, mode and checksum on the machine (one command for all of them), so an unchanged file
is never transferred; a replaced file is kept under BACKUP_DIR; services are reloaded only when one of their files
changed; what a killed earlier run of this machine uploaded beside those files and never moved into place is
removed. Packages are installed only when dpkg says they are not.

A changed file with a step after it (its services' reload; kvm-setup's sysctl, ifup, ...) is marked under
PENDING_DIR before it is put in place, and the mark goes once that step has worked: a run that fails or is
interrupted in between leaves the mark, and the next run does the step although the file no longer differs.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fabric import Connection

from kvmconf.recipes import FileSpec
from kvmconf.remote import SESSION_ERRORS, command, run, script, session_failure
from kvmconf.runner import TEMPORARY_SUFFIX, abandoned_among, temporary_beside

BACKUP_DIR = "/var/lib/kvmconf/backup"
# The marks of files whose step after a change (see above) is still to do: <PENDING_DIR><path of the file>.
PENDING_DIR = "/var/lib/kvmconf/pending"
_PENDING_PREFIX = "pending "

# In a VM's first minutes unattended-upgrades, or cloud-init's own packages, hold dpkg's lock: apt-get waits for it,
# up to this many seconds, instead of failing at once ("Unable to acquire the dpkg frontend lock").
DPKG_LOCK_WAIT = 300
_APT_OPTIONS = (
    # A package's conffile already on the machine is kept, not replaced: it is kvmconf's when update-confs pushed
    # it before the deploy that installs the package. dpkg would ask which to keep and, with no one to answer, fail.
    "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
    "-o", f"DPkg::Lock::Timeout={DPKG_LOCK_WAIT}",
)

# Args: pending dir, suffix, the number of directories, the directories, then the paths. Prints every
# "<dir>/.*.<suffix>" there (runner.temporary_beside's names, listed once per directory) NUL-terminated, then a
# line per path: "owner:group:mode sha256", or "-" when it is not a regular file; after _PENDING_PREFIX when the
# path has a mark.
_STATE = """pending=$1 suffix=$2 n=$3; shift 3
while [ "$n" -gt 0 ]; do
  for t in "${1%/}"/.*."$suffix"; do [ -e "$t" ] && printf '%s\\0' "$t"; done
  shift; n=$((n - 1))
done
for f do
  [ -e "$pending$f" ] && printf 'pending '
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    printf '%s %s\\n' "$(stat -c %U:%G:%a -- "$f")" "$(sha256sum < "$f" | cut -c1-64)"
  else echo -; fi
done"""
# Args: backup dir, stamp, then (tmp dest owner group mode) per file. On a failure, prints the file's dest.
_INSTALL = """bk=$1 stamp=$2; shift 2
while [ $# -gt 0 ]; do tmp=$1 dest=$2 own=$3 grp=$4 mode=$5; shift 5
  if [ -e "$dest" ]; then
    mkdir -p -- "$bk$(dirname -- "$dest")" && cp -p -- "$dest" "$bk$dest.$stamp" || { printf %s "$dest"; exit 1; }
  fi
  chown -- "$own:$grp" "$tmp" && chmod -- "$mode" "$tmp" && mv -f -- "$tmp" "$dest" || { printf %s "$dest"; exit 1; }
done"""
# Args: path, size. Writes that many bytes where an upload failed, to learn why (see upload), then removes them.
_WRITE_PROBE = 'head -c "$2" /dev/zero > "$1"; written=$?; rm -f -- "$1"; exit "$written"'


class StepFailed(Exception):
    """A step of a sync failed: ``step`` names it for the report, the message says why."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(kw_only=True)
class Changes:
    """What a sync did, or in a dry run would do; filled as it goes, so a failure midway keeps what was done."""

    installed: list[str] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # unchanged files whose step after a change an earlier run owes
    reloaded: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)  # dry run only


def check(result_ok: bool, step: str, message: str) -> None:
    """Raise StepFailed(step, message) unless result_ok."""
    if not result_ok:
        raise StepFailed(step, message)


def failure(res: object) -> str:
    """A failed command in one line: its exit status and the last line it wrote."""
    if getattr(res, "exited", None) == -1:  # paramiko's value when the channel closed without an exit status
        return ("the SSH session ended before the command did (no exit status): the machine may have rebooted, or"
                " the connection dropped")
    stderr = (getattr(res, "stderr", "") or getattr(res, "stdout", "") or "").strip().splitlines()
    return f"exit {getattr(res, 'exited', '?')}: {stderr[-1] if stderr else 'no output'}"


@dataclass(frozen=True)
class FileState:
    """A file as it is on the machine: its "owner:group:mode sha256" ("-": not a regular file), and whether an
    earlier run left it marked (PENDING_DIR)."""

    state: str
    pending: bool


def remote_state(conn: Connection, paths: Sequence[str]) -> tuple[list[FileState], list[str]]:
    """Each path's state (_STATE), and the temporaries beside them that killed runs of this machine left.

    One command for both: the temporaries are listed, once per directory, in the round trip that reads the
    checksums and the marks, and judged here, where their pids are (runner.abandoned_among).
    """
    if not paths:
        return [], []
    directories = sorted({str(PurePosixPath(p).parent) for p in paths})
    res = run(conn, script(_STATE, PENDING_DIR, TEMPORARY_SUFFIX, str(len(directories)), *directories, *paths))
    check(res.ok, "files", f"reading checksums: {failure(res)}")
    listing, _, states = res.stdout.rpartition("\0")  # the states' lines hold no NUL
    lines = states.splitlines()
    check(len(lines) == len(paths), "files", "reading checksums: unexpected output")
    temporaries = listing.split("\0")
    found = [FileState(line.removeprefix(_PENDING_PREFIX), line.startswith(_PENDING_PREFIX)) for line in lines]
    return found, [t for p in paths for t in abandoned_among(temporaries, p)]


def _wanted_state(spec: FileSpec) -> str:
    return f"{spec.owner}:{spec.group}:{int(spec.mode, 8):o} {hashlib.sha256(spec.content).hexdigest()}"


def push(conn: Connection, files: Sequence[FileSpec], changes: Changes, dry_run: bool, follow_up: bool = False) -> None:
    """Transfer the files whose checksum/owner/mode differ, back up what they replace, reload their services.

    ``follow_up``: the caller has a step of its own after any of ``files`` changes (kvm-setup: sysctl, ifup, ...),
    for the files in ``changes.pushed`` and ``changes.resumed``, and calls :func:`followed_up` once it has worked.
    Otherwise a file's step is the reload of its services, done here.
    """
    current, abandoned = remote_state(conn, [f.dest for f in files])
    if abandoned and not dry_run:
        # What killed runs of this machine uploaded and never moved into place: nothing else would remove it.
        res = run(conn, command("rm", "-f", "--", *abandoned))
        check(res.ok, "files", f"removing a killed run's temporaries: {failure(res)}")
    changed = [(f, now.state) for f, now in zip(files, current, strict=True) if now.state != _wanted_state(f)]
    resumed = [f for f, now in zip(files, current, strict=True) if now.pending and now.state == _wanted_state(f)]
    stepped = [f for f, _ in changed if follow_up or f.reload]
    services = sorted({s for f in [*stepped, *resumed] for s in f.reload})
    changes.resumed = [f.dest for f in resumed]
    if dry_run:
        for spec, state in changed:
            changes.diffs.append(_diff(conn, spec, state))
        changes.pushed = [f.dest for f, _ in changed]
        changes.reloaded = services
        return
    if changed:
        _install(conn, [f for f, _ in changed], [f.dest for f in stepped])
        changes.pushed = [f.dest for f, _ in changed]
    for service in services:
        res = run(conn, command("systemctl", "reload-or-restart", "--", service))
        check(res.ok, "files", f"reloading {service}: {failure(res)}")
        changes.reloaded.append(service)
    if not follow_up:
        followed_up(conn, [f.dest for f in [*stepped, *resumed]])  # every reload has worked


def followed_up(conn: Connection, dests: Sequence[str]) -> None:
    """Remove the marks of ``dests``: the step after their change is done."""
    if dests:
        res = run(conn, command("rm", "-f", "--", *(PENDING_DIR + d for d in dests)))
        check(res.ok, "files", f"removing the marks under {PENDING_DIR}: {failure(res)}")


def _install(conn: Connection, changed: Sequence[FileSpec], marked: Sequence[str]) -> None:
    """Put ``changed`` in place, each replaced file kept under BACKUP_DIR; the files ``marked`` get their mark first
    (PENDING_DIR): their step after the change is still to do."""
    parents = sorted({str(PurePosixPath(f.dest).parent) for f in changed})
    marks = [PENDING_DIR + d for d in marked]
    line = command("mkdir", "-p", "--", *parents, *sorted({str(PurePosixPath(m).parent) for m in marks}))
    res = run(conn, line + (" && " + command("touch", "--", *marks) if marks else ""))
    check(res.ok, "files", f"mkdir: {failure(res)}")
    args: list[str] = [BACKUP_DIR, time.strftime("%Y%m%dT%H%M%S", time.gmtime())]
    uploaded: list[str] = []
    try:
        for spec in changed:
            tmp = temporary_beside(spec.dest)  # this run's own, and a dot file that conf dirs skip
            uploaded.append(tmp)
            upload(conn, spec.content, tmp, "files", spec.dest)
            args += [tmp, spec.dest, spec.owner, spec.group, spec.mode]
        res = run(conn, script(_INSTALL, *args))
        # Which file: chown's "invalid user: 'nagios:root'" does not say, and the recipe may have many.
        check(res.ok, "files", f"installing {res.stdout or 'the files'}: {failure(res)}")
    except BaseException:
        # The temporaries not yet moved into place (rm -f: those moved are gone); a dead connection removes none,
        # and its own error is the one to report.
        with contextlib.suppress(Exception):
            run(conn, command("rm", "-f", "--", *uploaded))
        raise


def upload(conn: Connection, content: bytes, path: str, step: str, what: str) -> None:
    """Write ``content`` to ``path`` over SFTP; if that fails, StepFailed(step) saying why, naming ``what``.

    SFTP hardly says why: OpenSSH's server answers a read-only file system with "Failure", and a write cut short by
    a full one only shows as paramiko's "size mismatch in put!". So the shell is asked, by writing as many bytes
    there: its error ends with the system's reason ("No space left on device").
    """
    try:
        conn.sftp().putfo(io.BytesIO(content), path)
    except OSError as err:
        reason = session_failure(err)
        with contextlib.suppress(*SESSION_ERRORS):  # a dead connection: its own error is the reason
            probe = run(conn, script(_WRITE_PROBE, path, str(len(content))))
            if not probe.ok:
                reason = failure(probe).rpartition(": ")[2]
        raise StepFailed(step, f"uploading {what}: {reason}") from None


def _diff(conn: Connection, spec: FileSpec, state: str) -> str:
    old = b""
    if state != "-":
        buffer = io.BytesIO()
        conn.sftp().getfo(spec.dest, buffer)
        old = buffer.getvalue()
    head = f"--- {spec.dest}\n+++ {spec.dest} (from {spec.source})\n"
    if old == spec.content:
        return head + f"owner/mode: {state.split()[0]} -> {_wanted_state(spec).split()[0]}\n"
    try:
        lines = difflib.unified_diff(old.decode().splitlines(keepends=True), spec.content.decode().splitlines(True),
                                     f"{spec.dest}", f"{spec.dest} (from {spec.source})")
        return "".join(lines)
    except UnicodeDecodeError:
        return head + "binary content differs\n"


def missing_packages(conn: Connection, packages: Sequence[str]) -> list[str]:
    """The packages not installed on the machine `conn` reaches (read-only: dpkg-query)."""
    if not packages:
        return []
    res = run(conn, command("dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n", "--", *packages))
    installed = {line.split()[0] for line in res.stdout.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def install_packages(conn: Connection, packages: Sequence[str], changes: Changes, dry_run: bool = False) -> None:
    """Install the missing ones (only name them in a dry run); changes.installed lists them either way."""
    missing = missing_packages(conn, packages)
    if missing and not dry_run:
        line = command("apt-get", "install", "-y", "-q", *_APT_OPTIONS, "--", *missing)
        res = run(conn, "DEBIAN_FRONTEND=noninteractive " + line)
        check(res.ok, "packages", f"apt-get install {' '.join(missing)}: {failure(res)}")
    changes.installed = missing
