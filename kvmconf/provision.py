"""`invoke provision`: disks, seed ISOs and domains for VMs of cluster.conf, as one undoable run.

The run first plans everything (connecting to every host involved, checking every disk path), so
an unreachable URI or a disk in the way stops it before anything exists. While carrying the plan
out, each step that creates something is journalled with its undo as soon as it is done (a disk file
the moment it is in place, before its temporary is cleaned up); if a later step fails (or the run is
interrupted), the journalled steps are undone, newest first, and nothing that was there before is
touched. An interrupt never falls between a step and its journal entry: it waits for the entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import libvirt

from generators.model import Cluster, DiskKind
from kvmconf import disks, domains
from kvmconf.cli import say  # each line flushed as it is said: a log of both streams keeps their order
from kvmconf.connection import Connections, one_line
from kvmconf.errors import KvmconfError, ProvisionBlocked, ProvisionFailed
from kvmconf.plan import (
    Action,
    Artifacts,
    Plan,
    VmPlan,
    describe_change,
    format_plan,
    make_plan,
    seed_applies,
    select,
    size_notes,
)
from kvmconf.runner import Runner
from kvmconf.signals import interrupts_held, sigterm_as_interrupt

Log = Callable[[str], None]
Undo = Callable[[], object]


@dataclass(frozen=True)
class Options:
    apply: bool = False  # redefine domains whose definition changed (otherwise only show the diff)
    dry_run: bool = False  # show the plan, touch nothing
    reuse_disk: bool = False  # attach a disk found at the VM's path instead of stopping
    start: bool = True  # start newly defined domains


class Journal:
    """The steps this run has done, each with its undo."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.steps: list[tuple[str, Undo]] = []

    def done(self, what: str, undo: Undo) -> None:
        self.steps.append((what, undo))
        self.log(what)

    def rollback(self) -> tuple[list[str], list[str]]:
        """Undo every step, newest first; returns (undone, failed with why). Never raises."""
        undone, failed = [], []
        for what, undo in reversed(self.steps):
            try:
                undo()
                undone.append(what)
            except (KvmconfError, libvirt.libvirtError, OSError) as err:
                failed.append(f"{what} ({err})")
        self.steps.clear()
        return undone, failed


def provision(cluster: Cluster, names: Sequence[str], conns: Connections, options: Options = Options(),
              all_vms: bool = False, log: Log = say, artifacts: Artifacts | None = None) -> Plan:
    vms = select(cluster, names, all_vms)
    artifacts = artifacts or Artifacts(cluster)
    plan = make_plan(cluster, vms, conns, artifacts, strict=True)
    problems = plan.blocked(options.reuse_disk)
    if options.dry_run:
        log(format_plan(plan, options.reuse_disk, options.start))
    else:
        for why in plan.unchecked:
            log(f"warning, not checked: {why}")
    if problems:
        raise ProvisionBlocked("\n".join(problems) + "\nnothing was changed")
    if options.dry_run:
        return plan
    journal = Journal(log)
    try:
        with sigterm_as_interrupt():
            by_name = {p.vm.name: p for p in plan.vms}
            for vm in vms:  # cluster.conf order, which is deployment order
                try:
                    _carry_out(by_name[vm.name], conns, artifacts, options, journal)
                except libvirt.libvirtError as err:  # its message names neither the VM nor the host
                    raise KvmconfError(f"{vm.name} on {vm.host}: libvirt failed: {one_line(err)}") from err
    except (KvmconfError, libvirt.libvirtError, KeyboardInterrupt, OSError) as err:
        undone, failed = journal.rollback()
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
        message = [f"provisioning failed: {reason}"]
        message.append("undone: " + "; ".join(undone) if undone else "nothing had been created yet")
        if failed:
            message.append("COULD NOT UNDO (remove by hand): " + "; ".join(failed))
        raise ProvisionFailed("\n".join(message)) from err
    except BaseException:
        journal.rollback()  # a bug: still leave nothing behind, and show the traceback
        raise
    log(_summary(plan, options.apply))
    return plan


def _needs_apply(p: VmPlan) -> bool:
    """Whether a changed VM has more to change than its missing disk, which is created without --apply.

    A UUID other than the generated one is kept, not changed: the XML to define carries it (plan_vm).
    """
    return bool(p.diff or p.autostart_changes or p.seed_now)


def _summary(plan: Plan, applied: bool) -> str:
    changes = [p for p in plan.vms if p.action is Action.CHANGE]
    created, kept = plan.count(Action.CREATE), plan.count(Action.KEEP)
    if applied:
        return f"{created} created, {len(changes)} changed, {kept} unchanged"
    shown = sum(1 for p in changes if _needs_apply(p))
    made = len(changes) - shown  # only their disk was missing: made all the same
    return (f"{created} created, " + (f"{made} changed, " if made else "")
            + f"{shown} to change (shown, not applied), {kept} unchanged")


def _carry_out(p: VmPlan, conns: Connections, artifacts: Artifacts, options: Options, journal: Journal) -> None:
    name = p.vm.name
    runner = conns.runner(p.vm.host)
    conn = conns.get(p.vm.host)
    if p.action is Action.KEEP:
        journal.log(f"{name}: no change")
        for line in size_notes(p):
            journal.log(f"    {line}")
        return
    if not p.disk_exists:
        _create_disk(p, runner, journal)
    elif p.action is Action.CREATE:
        journal.log(f"{name}: reusing the existing disk {p.disk.path} (--reuse-disk)")
    if p.action is Action.CHANGE:
        _change(p, conn, runner, artifacts, options, journal)
        return
    if p.seed_path:
        _write_seed(p, runner, artifacts.seed_iso(p.vm), journal)
    with interrupts_held():  # each libvirt step and its journal entry as one
        dom = domains.define(conn, p.xml)
        journal.done(f"{name}: defined on {p.vm.host}", _undefine(dom))
    domains.set_autostart(dom, p.vm.autostart)  # undone with the domain
    if options.start:
        with interrupts_held():
            if domains.start(dom):
                journal.done(f"{name}: started", _power_off(dom))


def _create_disk(p: VmPlan, runner: Runner, journal: Journal) -> None:
    def created(_path: str = "") -> None:
        journal.done(f"{p.vm.name}: created {p.disk.describe()}", _remove_disk(runner, p.disk))

    if p.disk.kind is DiskKind.LVM:
        with interrupts_held():  # a volume is complete when lvcreate returns: journalled before an interrupt
            disks.create(runner, p.disk)
            created()
        return
    # A disk file is journalled from inside create(), once it is in place: an interrupt that lands while its
    # temporary is being removed must still undo it.
    disks.create(runner, p.disk, created)


def _change(p: VmPlan, conn: libvirt.virConnect, runner: Runner, artifacts: Artifacts, options: Options,
            journal: Journal) -> None:
    name = p.vm.name
    if not _needs_apply(p):
        return  # only the disk was missing, and it has been created
    changes = describe_change(dataclasses.replace(p, disk_exists=True))  # _carry_out has made a missing one
    if not options.apply:
        what = ("definition differs from cluster.conf" if p.diff or p.autostart_changes
                else "seed ISO differs from the generated one")
        journal.log(f"{name}: {what} (not applied; run again with --apply):")
        for line in changes:
            journal.log(f"    {line}")
        return
    assert p.old_xml is not None
    if p.diff:
        with interrupts_held():
            domains.define(conn, p.xml)
            journal.done(f"{name}: applied the new definition", _redefine(conn, p.old_xml))
        for line in changes:
            journal.log(f"    {line}")
    if p.seed_now:
        _write_seed(p, runner, artifacts.seed_iso(p.vm), journal, seed_applies(p))
    dom = conn.lookupByName(name)
    with interrupts_held():
        if domains.set_autostart(dom, p.vm.autostart):
            journal.done(f"{name}: autostart {'on' if p.vm.autostart else 'off'}",
                         _autostart(dom, not p.vm.autostart))


def _write_seed(p: VmPlan, runner: Runner, iso: bytes, journal: Journal, when: str = "") -> None:
    """Write the seed ISO in one piece (a temporary renamed over it: a running QEMU keeps the file it opened)."""
    assert p.seed_path is not None
    before = runner.read(p.seed_path)  # a leftover of an earlier VM of this name, or the old seed: restored if we fail
    if before == iso:
        return
    with interrupts_held():  # a seed ISO is small; a Ctrl-C still ends an ssh child, which fails the write
        runner.write(p.seed_path, iso)
        journal.done(f"{p.vm.name}: wrote seed ISO {p.seed_path}" + (f" ({when})" if when else ""),
                     _restore_file(runner, p.seed_path, before))


# Undo steps as small closures over their own values (not over loop variables).

def _remove_disk(runner: Runner, disk: disks.DiskSpec) -> Undo:
    return lambda: disks.remove(runner, disk)


def _undefine(dom: libvirt.virDomain) -> Undo:
    return lambda: domains.undefine(dom, keep_nvram=False)


def _power_off(dom: libvirt.virDomain) -> Undo:
    return lambda: domains.power_off(dom)


def _redefine(conn: libvirt.virConnect, xml: str) -> Undo:
    return lambda: domains.define(conn, xml)


def _autostart(dom: libvirt.virDomain, on: bool) -> Undo:
    return lambda: domains.set_autostart(dom, on)


def _restore_file(runner: Runner, path: str, before: bytes | None) -> Undo:
    if before is None:
        return lambda: runner.remove(path)
    return lambda: runner.write(path, before)
