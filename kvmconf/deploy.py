"""`fab deploy` and `fab update-confs`: put the recipes of hosts/ on the VMs over SSH, in dependency order.

Packages and files reach each VM through kvmconf.sync (only what differs is transferred, replaced files are
backed up, services reloaded when one of their files changed); then its hooks run. VMs run in waves: a VM
starts once the VMs of its ``after=`` are done, up to ``parallel`` at a time (with parallel=1 strictly in
cluster.conf order); the first failure lets the current wave finish and stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath

from fabric import Connection

from generators.model import Cluster, Vm
from generators.render import named_by_file
from kvmconf.errors import KvmconfError
from kvmconf.plan import select_or_all
from kvmconf.recipes import Recipe, recipe_for
from kvmconf.remote import SESSION_ERRORS, command, connect, resolve, run, session_failure
from kvmconf.sync import Changes, StepFailed, check, failure, install_packages, push, upload

HOOK_DIR = "/var/lib/kvmconf/hooks"


@dataclass
class VmReport(Changes):
    """One VM's run: the sync's changes (installed, pushed, reloaded, diffs), then its hooks, or where it failed."""

    vm: str
    steps: list[str] = field(default_factory=list)  # steps finished, in order
    hooks: list[str] = field(default_factory=list)
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
    interrupted: bool = False  # by Ctrl-C: the VMs being deployed were let end, no other was started
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
            why = "interrupted" if self.interrupted else "an earlier failure stopped later waves"
            line += f"; not started ({why}): {', '.join(self.not_started)}"
        return line


def waves(vms: Sequence[Vm], every: Sequence[Vm] = ()) -> list[list[Vm]]:
    """Group VMs so each wave only needs earlier waves (after= names earlier VMs; unselected ones count as met).

    What an unselected VM of ``every`` (cluster.conf's VMs) is after still counts: with web after db after ldap,
    `--vm ldap --vm web` deploys web after ldap, as one by one in cluster.conf order, not beside it.
    """
    level: dict[str, int] = {}  # a selected VM's wave; an unselected one's, the last wave it needs done
    chosen = {vm.name for vm in vms}
    for vm in every or vms:
        needed = max((level[d] for d in vm.after if d in level), default=-1)
        level[vm.name] = needed + 1 if vm.name in chosen else needed
    result: list[list[Vm]] = [[] for _ in range(max((level[vm.name] for vm in vms), default=-1) + 1)]
    for vm in vms:
        result[level[vm.name]].append(vm)
    return result


def run_hooks(conn: Connection, recipe: Recipe, report: VmReport) -> None:
    if not recipe.hooks:
        return
    run(conn, command("mkdir", "-p", "-m", "0700", "--", HOOK_DIR))
    sftp = conn.sftp()
    for hook in recipe.hooks:
        path = f"{HOOK_DIR}/{hook.name.replace('/', '_')}"
        upload(conn, hook.content, path, f"hook {hook.name}", path)
        sftp.chmod(path, 0o700)
        res = run(conn, command(path))
        check(res.ok, f"hook {hook.name}", failure(res))
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
    """Render every recipe before touching any VM: a template error stops the run before it starts.

    Banners name cluster.conf and site.toml: by their file names alone here, as generators' ``by_name`` does, so
    a file pushed is the same however their paths were given (run from hosts/, ../cluster.conf; KVMCONF_CLUSTER
    as a full path). Otherwise every VM's /etc/hosts and mcp's nagios files would be pushed again, nagios
    reloaded, and all of it pushed back by the next run from the checkout's top.
    """
    cluster = named_by_file(cluster)
    tree = _build_tree(cluster)
    kwargs = {"root": recipe_dir} if recipe_dir else {}
    return {vm.name: recipe_for(cluster, vm, tree, **kwargs) for vm in vms}


def _one(vm: Vm, recipe: Recipe, full: bool, options: Options) -> VmReport:
    report = VmReport(vm.name, dry_run=options.dry_run)
    step = "connect"
    unnamed = ""  # why connect failed, when the ssh config does not name the VM's address
    try:
        target = resolve(vm.name, options.ssh_config)
        if target.hostname == vm.name:
            # `make` writes a HostName for every VM of cluster.conf: an ssh config without one for this VM is an
            # older one (a VM added, then provisioned, which needs no `make`), or a hand-written one relying on DNS.
            unnamed = (f" ({options.ssh_config} gives no HostName for {vm.name}: if `make` wrote it, it predates"
                       " this VM: run `make` again)")
        if target.user != "root":  # else apt-get, the pushes into /etc and the reloads fail midway, one by one
            raise StepFailed(step, f"the ssh config logs in as {target.user!r}: deploy and update-confs install"
                             " packages, write system files and reload services as root (expected User root:"
                             " site.toml accounts.ssh_user = \"root\" makes the generated ssh config say so)")
        with connect(target) as conn:
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
    except StepFailed as err:
        report.failed_step, report.error = err.step, str(err)
    except KvmconfError as err:
        # remote's errors start with the VM's name, which the report's line starts with already.
        report.failed_step, report.error = step, str(err).removeprefix(f"{vm.name}: ")
    except SESSION_ERRORS as err:  # midway: that VM's failure, the other VMs go on
        report.failed_step, report.error = step, session_failure(err)
    if report.failed_step == "connect":
        report.error = f"{report.error}{unnamed}"
    return report


def run_cluster(cluster: Cluster, names: Sequence[str], full: bool, options: Options,
                progress: Callable[[VmReport], None] = lambda report: None,
                interrupted: Callable[[list[str]], None] = lambda running: None) -> RunReport:
    """deploy (full=True: packages, files, hooks) or update-confs (files only) on the chosen VMs, in waves.

    `progress` gets each VM's report as soon as that VM is done (one call at a time), so a long run shows where
    it is; the RunReport keeps them in cluster.conf order, and its summary only counts them.

    Ctrl-C starts no other VM, but lets those being deployed end: stopped midway, a VM's apt-get could leave dpkg
    interrupted, or a hook half done. `interrupted` gets their names at each Ctrl-C, so the run is not taken to
    ignore it (it used to say nothing until they ended); the report says so and which VMs were not started.
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

    groups = waves(vms, cluster.vms) if options.parallel > 1 else [[vm] for vm in vms]
    with ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool:
        for index, group in enumerate(groups):
            futures = [pool.submit(work, vm) for vm in group]
            while not all(future.done() for future in futures):
                try:
                    wait(futures)
                except KeyboardInterrupt:
                    result.interrupted = True
                    for future in futures:
                        future.cancel()  # those still queued; a running one cannot be
                    running = [vm.name for vm, future in zip(group, futures, strict=True) if not future.done()]
                    if running:
                        interrupted(running)
            result.reports += [future.result() for future in futures if not future.cancelled()]
            if result.failed or result.interrupted:
                result.not_started = [vm.name for vm, future in zip(group, futures, strict=True) if future.cancelled()]
                result.not_started += [vm.name for later in groups[index + 1:] for vm in later]
                break
    return result
