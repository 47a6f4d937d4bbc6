"""`fab deploy` and `fab update-confs`: put the recipes of hosts/ on the VMs over SSH, in dependency order.

Files are compared by checksum on the VM (one command for all of a VM's files), so an unchanged file is never
transferred; a replaced file is kept under BACKUP_DIR; services are reloaded only when one of their files
changed; what a killed earlier run of this machine uploaded beside those files and never moved into place is
removed. VMs run in waves: a VM starts once the VMs of its ``after=`` are done, up to ``parallel`` at a time
(with parallel=1 strictly in cluster.conf order); the first failure lets the current wave finish and stops.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

from fabric import Connection

from generators.model import Cluster, Vm
from kvmconf.errors import KvmconfError
from kvmconf.plan import select_or_all
from kvmconf.recipes import FileSpec, Recipe, recipe_for
from kvmconf.remote import SESSION_ERRORS, command, connect, resolve, run, script, session_failure
from kvmconf.runner import TEMPORARY_SUFFIX, abandoned_among, temporary_beside

BACKUP_DIR = "/var/lib/kvmconf/backup"
HOOK_DIR = "/var/lib/kvmconf/hooks"

# Args: suffix, the number of directories, the directories, then the paths. Prints every "<dir>/.*.<suffix>"
# there (runner.temporary_beside's names, listed once per directory) NUL-terminated, then a line per path:
# "owner:group:mode sha256", or "-" when it is not a regular file.
_STATE = """suffix=$1 n=$2; shift 2
while [ "$n" -gt 0 ]; do
  for t in "${1%/}"/.*."$suffix"; do [ -e "$t" ] && printf '%s\\0' "$t"; done
  shift; n=$((n - 1))
done
for f do
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    printf '%s %s\\n' "$(stat -c %U:%G:%a -- "$f")" "$(sha256sum < "$f" | cut -c1-64)"
  else echo -; fi
done"""
# Args: backup dir, stamp, then (tmp dest owner group mode) per file.
_INSTALL = """bk=$1 stamp=$2; shift 2
while [ $# -gt 0 ]; do tmp=$1 dest=$2 own=$3 grp=$4 mode=$5; shift 5
  if [ -e "$dest" ]; then mkdir -p -- "$bk$(dirname -- "$dest")" && cp -p -- "$dest" "$bk$dest.$stamp" || exit 1; fi
  chown -- "$own:$grp" "$tmp" && chmod -- "$mode" "$tmp" && mv -f -- "$tmp" "$dest" || exit 1
done"""


@dataclass
class VmReport:
    vm: str
    steps: list[str] = field(default_factory=list)  # steps finished, in order
    installed: list[str] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)  # --dry-run only
    failed_step: str | None = None
    error: str | None = None
    dry_run: bool = False  # installed, pushed, reloaded and hooks say what would be done

    def line(self) -> str:
        if self.failed_step:
            return f"{self.vm}: FAILED at {self.failed_step}: {self.error}"
        if self.dry_run:
            return f"{self.vm}: would {'; '.join(self._parts())}"
        return f"{self.vm}: done ({'; '.join(self._parts())})"

    def _parts(self) -> list[str]:
        """Packages, files, reloads, hooks: what was done, or in a dry run what would be (then naming them)."""
        def counted(names: list[str], what: str, done: str, would: str) -> str:
            if self.dry_run:
                return f"{would} {len(names)} {what}" + (f" ({', '.join(names)})" if names else "")
            return f"{len(names)} {what} {done}"

        parts = [counted(self.pushed, "file(s)", "changed", "change")]
        if "packages" in self.steps:
            parts.insert(0, counted(self.installed, "package(s)", "installed", "install"))
        if self.reloaded:
            parts.append(f"{'reload' if self.dry_run else 'reloaded'} {', '.join(self.reloaded)}")
        if "hooks" in self.steps:
            parts.append(counted(self.hooks, "hook(s)", "run", "run"))
        return parts


@dataclass
class RunReport:
    action: str
    reports: list[VmReport] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, vm, start|end), for tests

    @property
    def failed(self) -> list[VmReport]:
        return [r for r in self.reports if r.failed_step]

    def summary(self) -> str:
        """The run's last line: how many VMs, which failed and at which step, which were not started.

        Each VM's own line was printed as that VM ended (``progress`` of :func:`run_cluster`), so it is not
        repeated here: on a cluster of hundreds the outcome would otherwise scroll away under the copies.
        """
        line = f"{self.action}: {len(self.reports)} VM(s), {len(self.failed)} failed"
        if self.failed:
            line += ": " + ", ".join(f"{r.vm} ({r.failed_step})" for r in self.failed)
        if self.not_started:
            line += f"; not started (an earlier failure stopped later waves): {', '.join(self.not_started)}"
        return line


class _StepFailed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


def waves(vms: Sequence[Vm]) -> list[list[Vm]]:
    """Group VMs so each wave only needs earlier waves (after= names earlier VMs; unselected ones count as met)."""
    level: dict[str, int] = {}
    chosen = {vm.name for vm in vms}
    for vm in vms:
        level[vm.name] = 1 + max((level[d] for d in vm.after if d in chosen), default=-1)
    result: list[list[Vm]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for vm in vms:
        result[level[vm.name]].append(vm)
    return result


def _check(result_ok: bool, step: str, message: str) -> None:
    if not result_ok:
        raise _StepFailed(step, message)


def _failure(res: object) -> str:
    stderr = (getattr(res, "stderr", "") or getattr(res, "stdout", "") or "").strip().splitlines()
    return f"exit {getattr(res, 'exited', '?')}: {stderr[-1] if stderr else 'no output'}"


def remote_state(conn: Connection, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Each path's state (_STATE), and the temporaries beside them that killed runs of this machine left.

    One command for both: the temporaries are listed, once per directory, in the round trip that reads the
    checksums, and judged here, where their pids are (runner.abandoned_among).
    """
    if not paths:
        return [], []
    directories = sorted({str(PurePosixPath(p).parent) for p in paths})
    res = run(conn, script(_STATE, TEMPORARY_SUFFIX, str(len(directories)), *directories, *paths))
    _check(res.ok, "files", f"reading checksums: {_failure(res)}")
    listing, _, states = res.stdout.rpartition("\0")  # the states' lines hold no NUL
    lines = states.splitlines()
    _check(len(lines) == len(paths), "files", "reading checksums: unexpected output")
    temporaries = listing.split("\0")
    return lines, [t for p in paths for t in abandoned_among(temporaries, p)]


def _wanted_state(spec: FileSpec) -> str:
    return f"{spec.owner}:{spec.group}:{int(spec.mode, 8):o} {hashlib.sha256(spec.content).hexdigest()}"


def push(conn: Connection, files: Sequence[FileSpec], report: VmReport, dry_run: bool) -> None:
    """Transfer the files whose checksum/owner/mode differ, back up what they replace, reload their services."""
    current, abandoned = remote_state(conn, [f.dest for f in files])
    if abandoned and not dry_run:
        # What killed runs of this machine uploaded and never moved into place: nothing else would remove it.
        res = run(conn, command("rm", "-f", "--", *abandoned))
        _check(res.ok, "files", f"removing a killed run's temporaries: {_failure(res)}")
    changed = [(f, state) for f, state in zip(files, current, strict=True) if state != _wanted_state(f)]
    if dry_run:
        for spec, state in changed:
            report.diffs.append(_diff(conn, spec, state))
        report.pushed = [f.dest for f, _ in changed]
        report.reloaded = sorted({s for f, _ in changed for s in f.reload})
        return
    if not changed:
        return
    parents = sorted({str(PurePosixPath(f.dest).parent) for f, _ in changed})
    res = run(conn, command("mkdir", "-p", "--", *parents))
    _check(res.ok, "files", f"mkdir: {_failure(res)}")
    args: list[str] = [BACKUP_DIR, time.strftime("%Y%m%dT%H%M%S", time.gmtime())]
    sftp = conn.sftp()
    uploaded: list[str] = []
    try:
        for spec, _ in changed:
            tmp = temporary_beside(spec.dest)  # this run's own, and a dot file that conf dirs skip
            uploaded.append(tmp)
            sftp.putfo(io.BytesIO(spec.content), tmp)
            args += [tmp, spec.dest, spec.owner, spec.group, spec.mode]
        res = run(conn, script(_INSTALL, *args))
        _check(res.ok, "files", f"installing: {_failure(res)}")
    except BaseException:
        # The temporaries not yet moved into place (rm -f: those moved are gone); a dead connection removes none,
        # and its own error is the one to report.
        with contextlib.suppress(Exception):
            run(conn, command("rm", "-f", "--", *uploaded))
        raise
    report.pushed = [f.dest for f, _ in changed]
    services = sorted({s for f, _ in changed for s in f.reload})
    for service in services:
        res = run(conn, command("systemctl", "reload-or-restart", "--", service))
        _check(res.ok, "files", f"reloading {service}: {_failure(res)}")
        report.reloaded.append(service)


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


def install_packages(conn: Connection, packages: Sequence[str], report: VmReport, dry_run: bool = False) -> None:
    """Install the missing ones (only name them in a dry run); report.installed lists them either way."""
    missing = missing_packages(conn, packages)
    if missing and not dry_run:
        res = run(conn, "DEBIAN_FRONTEND=noninteractive " + command("apt-get", "install", "-y", "-q", "--", *missing))
        _check(res.ok, "packages", f"apt-get install {' '.join(missing)}: {_failure(res)}")
    report.installed = missing


def run_hooks(conn: Connection, recipe: Recipe, report: VmReport) -> None:
    if not recipe.hooks:
        return
    run(conn, command("mkdir", "-p", "-m", "0700", "--", HOOK_DIR))
    sftp = conn.sftp()
    for hook in recipe.hooks:
        path = f"{HOOK_DIR}/{hook.name.replace('/', '_')}"
        sftp.putfo(io.BytesIO(hook.content), path)
        sftp.chmod(path, 0o700)
        res = run(conn, command(path))
        _check(res.ok, f"hook {hook.name}", _failure(res))
        report.hooks.append(hook.name)


@dataclass
class Options:
    ssh_config: Path
    parallel: int = 1
    dry_run: bool = False
    recipe_dir: Path | None = None


def _build_tree(cluster: Cluster) -> Callable[[], dict[PurePosixPath, str | bytes]]:
    @cache
    def tree() -> dict[PurePosixPath, str | bytes]:
        from generators.build import render_all

        return render_all(cluster)

    return tree


def recipes(cluster: Cluster, vms: Sequence[Vm], recipe_dir: Path | None = None) -> dict[str, Recipe]:
    """Render every recipe before touching any VM: a template error stops the run before it starts."""
    tree = _build_tree(cluster)
    kwargs = {"root": recipe_dir} if recipe_dir else {}
    return {vm.name: recipe_for(cluster, vm, tree, **kwargs) for vm in vms}


def _one(vm: Vm, recipe: Recipe, full: bool, options: Options) -> VmReport:
    report = VmReport(vm.name, dry_run=options.dry_run)
    step = "connect"
    try:
        with connect(resolve(vm.name, options.ssh_config)) as conn:
            if full:
                step = "packages"
                install_packages(conn, recipe.packages, report, options.dry_run)
                report.steps.append("packages")
            step = "files"
            push(conn, recipe.files, report, options.dry_run)
            report.steps.append("files")
            if full:
                step = "hooks"
                if options.dry_run:
                    report.hooks = [hook.name for hook in recipe.hooks]  # hooks change things: listed, not run
                else:
                    run_hooks(conn, recipe, report)
                report.steps.append("hooks")
    except _StepFailed as err:
        report.failed_step, report.error = err.step, str(err)
    except KvmconfError as err:
        # remote's errors start with the VM's name, which the report's line starts with already.
        report.failed_step, report.error = step, str(err).removeprefix(f"{vm.name}: ")
    except SESSION_ERRORS as err:  # midway: that VM's failure, the other VMs go on
        report.failed_step, report.error = step, session_failure(err)
    return report


def run_cluster(cluster: Cluster, names: Sequence[str], full: bool, options: Options,
                progress: Callable[[VmReport], None] = lambda report: None) -> RunReport:
    """deploy (full=True: packages, files, hooks) or update-confs (files only) on the chosen VMs, in waves.

    `progress` gets each VM's report as soon as that VM is done (one call at a time), so a long run shows where
    it is; the RunReport keeps them in cluster.conf order, and its summary only counts them.
    """
    vms = select_or_all(cluster, names)
    plan = recipes(cluster, vms, options.recipe_dir)
    result = RunReport("deploy" if full else "update-confs")
    lock = threading.Lock()

    def work(vm: Vm) -> VmReport:
        with lock:
            result.events.append((time.monotonic(), vm.name, "start"))
        report = _one(vm, plan[vm.name], full, options)
        with lock:
            result.events.append((time.monotonic(), vm.name, "end"))
            progress(report)
        return report

    groups = waves(vms) if options.parallel > 1 else [[vm] for vm in vms]
    with ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool:
        for index, group in enumerate(groups):
            result.reports += list(pool.map(work, group))
            if result.failed:
                result.not_started = [vm.name for later in groups[index + 1:] for vm in later]
                break
    return result
