"""What provisioning would create, change or leave alone, per physical host, touching nothing.

``invoke plan`` prints it; ``invoke provision`` computes the same plan and then carries it out, so
what the plan shows is what provisioning does.
"""

from __future__ import annotations

import difflib
import hashlib
import posixpath
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import PurePosixPath
from typing import Literal

import libvirt

from generators import cloud_init, domain_xml
from generators.model import Cluster, DiskKind, PhysicalHost, Vm
from generators.paths import seed_iso_path
from kvmconf import defined, disks, domains
from kvmconf.connection import Connections, failure_noted
from kvmconf.disks import DiskSpec
from kvmconf.errors import UnknownHost, UnknownVm, WrongUsage
from kvmconf.runner import Runner

# A defined VM's seed ISO on its host: None when it is the generated one (or the VM has no seed).
SeedOnHost = Literal["missing", "different"] | None


class Action(StrEnum):
    CREATE = "create"
    CHANGE = "change"
    KEEP = "unchanged"


_MARK = {Action.CREATE: "+", Action.CHANGE: "~", Action.KEEP: "="}


class Artifacts:
    """The generated files provisioning needs, rendered in memory from the cluster as given.

    In memory rather than read from build/: the lab adjusts the cluster (URIs, paths, domain
    type) before rendering, and a stale build/ can never be provisioned by mistake.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @cached_property
    def _domains(self) -> dict[PurePosixPath, str | bytes]:
        return domain_xml.render(self.cluster)

    @cached_property
    def _seeds(self) -> dict[PurePosixPath, str | bytes]:
        return cloud_init.render(self.cluster)

    def domain_xml(self, vm: Vm) -> str:
        xml = self._domains[PurePosixPath("libvirt", f"{vm.name}.xml")]
        assert isinstance(xml, str)
        return xml

    def seed_iso(self, vm: Vm) -> bytes:
        iso = self._seeds.get(PurePosixPath("cloud-init", f"{vm.name}.iso"))
        if not isinstance(iso, bytes):
            raise RuntimeError(f"programming error: generators.cloud_init made no seed ISO for {vm.name!r}")
        return iso


@dataclass
class VmPlan:
    vm: Vm
    action: Action
    xml: str  # what to define: the generated XML, carrying the defined domain's UUID when changing
    disk: DiskSpec
    disk_exists: bool
    diff: list[str] = field(default_factory=list)
    autostart_now: bool | None = None  # for a defined domain: its autostart flag today
    running: bool = False
    old_xml: str | None = None  # the defined domain's inactive XML, to restore if a run fails
    uuid_kept: str | None = None  # set when the defined UUID differs from the generated one
    seed_path: str | None = None  # the NoCloud seed ISO on the host, for install=cloud
    seed_now: SeedOnHost = None  # for a defined domain: how its seed ISO on the host compares with the generated one
    disk_in_use: str | None = None  # for a defined domain: its disk, when cluster.conf now gives it another path
    disk_size_now: int | None = None  # for a defined domain: its disk's size in bytes, when not cluster.conf's

    @property
    def autostart_changes(self) -> bool:
        return self.autostart_now is not None and self.autostart_now != self.vm.autostart



@dataclass
class HostPlan:
    host: str
    uri: str
    vms: list[VmPlan] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # defined here, not in cluster.conf (left alone)
    misplaced: dict[str, str] = field(default_factory=dict)  # defined here, cluster.conf places it on another host
    error: str | None = None  # the host could not be reached, or a libvirt call failed there
    not_planned: int = 0  # the VMs placed on it that its error left without a plan
    problems: list[str] = field(default_factory=list)  # what would make creating a disk fail, found up front


@dataclass
class Plan:
    hosts: list[HostPlan]
    unchecked: list[str] = field(default_factory=list)  # hosts whose domains could not be compared with new VMs

    @property
    def vms(self) -> list[VmPlan]:
        return [p for h in self.hosts for p in h.vms]

    def blocked(self, reuse_disk: bool) -> list[str]:
        """Why provisioning must not start: unreachable hosts, disks in the way of new domains."""
        problems = [h.error for h in self.hosts if h.error] + [m for h in self.hosts for m in h.problems]
        if not reuse_disk:
            problems += [disks.already_there(p.disk) for p in self.vms if p.action is Action.CREATE and p.disk_exists]
        return problems

    def count(self, action: Action) -> int:
        return sum(1 for p in self.vms if p.action is action)


def vms_or_all(names: Sequence[str], all_vms: bool, every: str = "every VM in cluster.conf") -> None:
    """Refuse neither and both of --vm NAME and --all (``every`` says what --all means): either would be a guess."""
    if all_vms and names:
        raise WrongUsage(f"give --vm NAME or --all, not both (--all means {every})")
    if not all_vms and not names:
        raise WrongUsage(f"name the VMs with --vm NAME (repeatable), or give --all for {every}")


def select(cluster: Cluster, names: Sequence[str], all_vms: bool) -> list[Vm]:
    """The VMs named (or all of them, in cluster.conf order); unknown names are an error."""
    vms_or_all(names, all_vms)
    if all_vms:
        return list(cluster.vms)
    find_vms(cluster, names)
    wanted = set(names)
    return [vm for vm in cluster.vms if vm.name in wanted]


def select_or_all(cluster: Cluster, names: Sequence[str]) -> list[Vm]:
    """The VMs named, or every VM when none is: the rule of the tasks whose --vm is optional (plan, deploy, ...)."""
    return select(cluster, names, all_vms=not names)


# An unknown VM name is answered with this many of the VMs: enough to show how they are named,
# short enough for a cluster of a thousand.
SHOWN_VMS = 5


def find_vm(cluster: Cluster, name: str) -> Vm:
    """The VM of cluster.conf called `name`; an unknown name is an error that suggests close ones and shows a few."""
    if not name:  # the tasks acting on one VM default --vm to "" (see tasks.py)
        raise WrongUsage("name the VM with --vm NAME")
    return find_vms(cluster, [name])[0]


def find_vms(cluster: Cluster, names: Sequence[str]) -> list[Vm]:
    """The VMs called `names`, as :func:`find_vm` finds one; every unknown name is in the one error, each with its
    close matches, as :func:`find_hosts` does for hosts."""
    by_name = {vm.name: vm for vm in cluster.vms}
    unknown = [name for name in dict.fromkeys(names) if name not in by_name]
    if not unknown:
        return [by_name[name] for name in names]
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(by_name), n=3)
        hints.append(f" (did you mean {', '.join(close)}?)" if close else "")
    shown = ", ".join(list(by_name)[:SHOWN_VMS])
    if len(by_name) > SHOWN_VMS:
        shown += f", ... ({len(by_name)} in all; `invoke status` lists them)"
    allowed = f"; expected one of: {shown}" if by_name else "; it has no VMs"
    if len(unknown) == 1:
        raise UnknownVm(f"{unknown[0]!r} is not a VM of {cluster.source}{hints[0]}{allowed}")
    named = ", ".join(f"{name!r}{hint}" for name, hint in zip(unknown, hints, strict=True))
    raise UnknownVm(f"{named} are not VMs of {cluster.source}{allowed}")


# What find_host(s) say when the tasks' --host default ("") reaches them; a task with another option says its own.
NO_HOST = "name the host with --host NAME"


def find_host(cluster: Cluster, name: str, missing: str = NO_HOST) -> PhysicalHost:
    """The physical host of site.toml called `name`; an unknown name is an error listing them all (they are few).

    No name is the usage error ``missing`` (it names the option): the tasks default it to "" (see tasks.py).
    """
    return find_hosts(cluster, [name], missing)[0]


def find_hosts(cluster: Cluster, names: Sequence[str], missing: str = NO_HOST) -> list[PhysicalHost]:
    """The physical hosts called `names`, as :func:`find_host` finds one; every unknown name is in the one error."""
    if "" in names:
        raise WrongUsage(missing)
    unknown = [name for name in dict.fromkeys(names) if name not in cluster.site.hosts]
    if unknown:
        which = f"{unknown[0]!r} is not a host" if len(unknown) == 1 else \
            f"{', '.join(map(repr, unknown))} are not hosts"
        raise UnknownHost(f"{which} of {cluster.site.path} (expected one of: {', '.join(sorted(cluster.site.hosts))})")
    return [cluster.site.hosts[name] for name in names]


def plan_vm(cluster: Cluster, vm: Vm, disk: DiskSpec, exists: bool, conn: libvirt.virConnect, artifacts: Artifacts,
            aliases: dict[tuple[str, str], str]) -> VmPlan:
    """The plan for one VM whose disk is ``disk``; ``exists`` tells whether that is on the host already."""
    xml = artifacts.domain_xml(vm)
    seed = seed_iso_path(cluster, vm)
    dom = domains.lookup(conn, vm.name)
    if dom is None:
        return VmPlan(vm, Action.CREATE, xml, disk, exists, seed_path=seed)
    live = domains.inactive_xml(dom)
    uuid = dom.UUIDString()
    generated_uuid = domains.uuid_of(xml)
    xml = domains.with_uuid(xml, uuid)
    diff = domains.definition_diff(live, xml, aliases, vm.name)
    plan = VmPlan(vm, Action.KEEP, xml, disk, exists, diff, bool(dom.autostart()), domains.is_active(dom), live,
                  uuid if generated_uuid != uuid else None, seed, disk_in_use=disk_in_use(live, xml, disk.path))
    if diff or plan.autostart_changes or not exists:
        plan.action = Action.CHANGE
    return plan


def disk_in_use(live_xml: str, xml: str, path: str) -> str | None:
    """The disk a defined domain has where the generated ``xml`` puts ``path``; None when it is ``path``, or none.

    Another path means that cluster.conf or site.toml changed where the VM's disk is (disk=, disk_dir): the
    domain's own disk is elsewhere, and holds the VM's data.
    """
    targets = [target for target, source in domains.disk_sources(xml).items() if source == path]
    now = domains.disk_sources(live_xml).get(targets[0]) if targets else None
    return now if now != path else None


def disk_replaced(p: VmPlan) -> str:
    """Why provision stops for a defined VM whose disk cluster.conf now puts at a path where none is."""
    name = p.vm.name
    return (f"{name}: its domain's disk is {p.disk_in_use}, but cluster.conf now puts its disk at {p.disk.path},"
            f" where there is none: provision never moves or converts a disk, and would give {name} a new, empty"
            f" one; to keep its data, put the disk there by hand (mv, qemu-img convert) and run again,"
            f" or change disk= (or disk_dir) back; for an empty disk, `invoke destroy --vm {name}` first (it keeps"
            " the old disk)")


def make_plan(cluster: Cluster, vms: Iterable[Vm], conns: Connections, artifacts: Artifacts | None = None,
              others: bool = False, strict: bool = True) -> Plan:
    """Compare each VM with its host; ``others`` also lists domains on those hosts not in cluster.conf.

    With ``strict``, an unreachable host, or a libvirt call failing there, raises at once (provisioning); otherwise
    it is recorded in the plan and the other hosts are still shown (``invoke plan``).
    """
    artifacts = artifacts or Artifacts(cluster)
    by_host: dict[str, list[Vm]] = {}
    for vm in vms:
        by_host.setdefault(vm.host, []).append(vm)
    hosts = []
    for host in sorted(by_host):
        hplan = HostPlan(host, conns.uri(host))
        hosts.append(hplan)
        with nullcontext() if strict else failure_noted(hplan):
            plan_host(cluster, hplan, by_host[host], conns, artifacts)
        if hplan.error:
            hplan.not_planned = len(by_host[host])
    plan = Plan(hosts)
    creates = [p for p in plan.vms if p.action is Action.CREATE]
    if not (creates or others):
        return plan
    # One listing of every host's domains for the whole run, whatever the number of VMs.
    found = defined.inventory(cluster, conns, {h.host: h.error for h in hosts if h.error})
    for hplan in hosts:
        hplan.problems += [problem for p in hplan.vms if p.action is Action.CREATE for problem in found.clashes(p.vm)]
        if others and hplan.error is None:
            hplan.others, hplan.misplaced = foreign_domains(cluster, hplan.host, conns, found.names_on(hplan.host))
    if creates:
        plan.unchecked = [f"{why}; so whether a VM to create is defined there already (under its name or MAC) is"
                          " not known" for host, why in found.unreachable.items() if host not in by_host]
    return plan


def plan_host(cluster: Cluster, hplan: HostPlan, vms: Sequence[Vm], conns: Connections, artifacts: Artifacts) -> None:
    """Fill in the plan of one host for ``vms``, all placed on it: at the end, so a host that fails midway (the
    caller notes why) shows no half plan."""
    conn, runner = conns.get(hplan.host), conns.runner(hplan.host)
    aliases = domains.machine_aliases(conn)
    specs = [disks.disk_spec(cluster, vm) for vm in vms]
    # "<dir>/." exists only where <dir> is a directory: a disk_dir missing on the host is found with the disks.
    folders = {disk.path: posixpath.join(posixpath.dirname(disk.path), ".") for disk in specs
               if disk.kind is not DiskKind.LVM}
    # One command for the host's VMs, not one per VM.
    present = runner.existing([disk.path for disk in specs] + sorted(set(folders.values())))
    planned = [plan_vm(cluster, vm, disk, disk.path in present, conn, artifacts, aliases)
               for vm, disk in zip(vms, specs, strict=True)]
    problems = [disk_replaced(p) for p in planned if p.disk_in_use and not p.disk_exists]
    to_create = [p.disk for p in planned if not p.disk_exists and not p.disk_in_use]
    unplaceable = [disk for disk in to_create if disk.path in folders and folders[disk.path] not in present]
    problems += missing_folders(hplan.host, unplaceable, cluster)
    problems += disks.missing_volume_groups(runner, hplan.host, to_create)
    problems += disks.base_image_problems(runner, hplan.host, to_create)
    compare_seeds(runner, [p for p in planned if p.action is not Action.CREATE], artifacts)
    compare_sizes(runner, [p for p in planned if p.action is not Action.CREATE and p.disk_exists])
    hplan.vms, hplan.problems = planned, problems


def missing_folders(host: str, to_create: Sequence[DiskSpec], cluster: Cluster) -> list[str]:
    """Why the disk files ``to_create``, whose directory is not on ``host``, cannot be made: one line per directory.

    Found before anything is created: qemu-img would fail only once the VMs before them were made (and undone).
    """
    by_folder: dict[str, list[str]] = {}
    for disk in to_create:
        by_folder.setdefault(posixpath.dirname(disk.path), []).append(disk.vm)
    return [f"{', '.join(vms)}: the directory {folder} for {'its disk' if len(vms) == 1 else 'their disks'} is not"
            f" on {host}; create it there (`fab kvm-setup` does), or fix disk_dir of [hosts.{host}] in"
            f" {cluster.site.path}" for folder, vms in sorted(by_folder.items())]


def compare_seeds(runner: Runner, defined_vms: Sequence[VmPlan], artifacts: Artifacts) -> None:
    """Mark the defined VMs whose seed ISO on the host is missing or not the generated one, in one command per host.

    The seed changes with what cloud-init is given (ssh_keys, the IP, ...) and so does its instance-id, so that
    cloud-init applies it at the VM's next boot, once it is on the host. Checksums, not the ISOs, cross the wire.
    """
    with_seed = [p for p in defined_vms if p.seed_path]
    if not with_seed:
        return
    # One line per path, in order: its checksum, "-" when it is missing, "?" when it cannot be read (then it is
    # rewritten like a different one, and the write says why it fails if it does).
    script = ('for p in "$@"; do if [ ! -e "$p" ]; then echo -; elif s=$(sha256sum < "$p"); then echo "${s%% *}";'
              ' else echo "?"; fi; done')
    sums = runner.check(["sh", "-c", script, "sh", *(p.seed_path or "" for p in with_seed)]).stdout.decode().split()
    for p, now in zip(with_seed, sums, strict=True):
        if now == "-":
            p.seed_now = "missing"
        elif now != hashlib.sha256(artifacts.seed_iso(p.vm)).hexdigest():
            p.seed_now = "different"
        if p.seed_now:
            p.action = Action.CHANGE


def compare_sizes(runner: Runner, defined_vms: Sequence[VmPlan]) -> None:
    """Note the defined VMs whose disk is not the size cluster.conf gives: provision never resizes a disk, and says
    so, rather than "no change" for a size the admin has just raised."""
    sizes = disks.virtual_sizes(runner, [p.disk.path for p in defined_vms])
    for p in defined_vms:
        now = sizes.get(p.disk.path)
        if now is not None and now != p.vm.disk.size_gb * disks.GIB:
            p.disk_size_now = now


def size_notes(p: VmPlan) -> list[str]:
    """A line saying that the VM's disk is not cluster.conf's size and is left so; none when it is."""
    if p.disk_size_now is None:
        return []
    return [f"note: disk {p.disk.path} is {p.disk_size_now / disks.GIB:g} GB, cluster.conf says {p.vm.disk.size_gb}:"
            " provision never resizes a disk; resize it by hand (virsh blockresize, lvextend; then the guest's"
            " partition and file system), or make cluster.conf say its size"]


def foreign_domains(cluster: Cluster, host: str, conns: Connections,
                    names: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Of the domains ``names`` on ``host``, those cluster.conf does not put there: unknown ones, and ones placed
    elsewhere."""
    sharing = conns.hosts_sharing_uri(host)
    placed = {vm.name: vm.host for vm in cluster.vms}
    unknown, misplaced = [], {}
    for name in sorted(names):
        if name not in placed:
            unknown.append(name)
        elif placed[name] not in sharing:
            misplaced[name] = placed[name]
    return unknown, misplaced


def describe_create(p: VmPlan, reuse_disk: bool, start: bool) -> str:
    steps = []
    if p.disk_exists:
        steps.append(f"reuse existing disk {p.disk.path}" if reuse_disk else f"STOP: disk {p.disk.path} exists")
    else:
        steps.append(f"create {p.disk.describe()}")
    if p.seed_path:
        steps.append(f"write seed ISO {p.seed_path}")
    steps.append("define")
    steps.append(f"autostart {'on' if p.vm.autostart else 'off'}")
    if start:
        steps.append("start")
    return "; ".join(steps)


def describe_change(p: VmPlan) -> list[str]:
    lines = []
    if p.disk_in_use and not p.disk_exists:
        lines.append(f"STOP: disk {p.disk.path} is missing, and its domain's disk is {p.disk_in_use} (see !)")
    elif not p.disk_exists:
        lines.append(f"disk {p.disk.path} is missing: create {p.disk.describe()}")
    if p.autostart_changes:
        lines.append(f"autostart {'on' if p.autostart_now else 'off'} -> {'on' if p.vm.autostart else 'off'}")
    if p.uuid_kept:
        lines.append(f"keeps its UUID {p.uuid_kept} (not the generated one)")
    if p.seed_now:
        lines.append(describe_seed(p))
    lines.extend(size_notes(p))
    lines.extend(p.diff)
    if p.diff and p.running:
        lines.append("(running: a new definition takes effect when the VM is next started)")
    return lines


def describe_seed(p: VmPlan) -> str:
    what = "is missing: write it" if p.seed_now == "missing" else "differs from the generated one: replace it"
    return f"seed ISO {p.seed_path} {what} ({seed_applies(p)})"


def seed_applies(p: VmPlan) -> str:
    """When a new seed ISO reaches the guest: QEMU keeps the file it opened at start (the old one, once replaced)
    until the VM is powered off, so a reboot inside a running guest still sees the old seed."""
    if p.running:
        return "applies at the next cold boot: the running VM keeps the old one open until it is shut down and started"
    return "applies at the next boot"


def format_plan(plan: Plan, reuse_disk: bool = False, start: bool = True) -> str:
    out = []
    for h in plan.hosts:
        out.append(f"{h.host} ({h.uri}):")
        if h.error:
            out.append(f"  ! {h.error}")  # it names the host and what failed: unreachable, or a libvirt call
            continue
        out.extend(f"  ! {problem}" for problem in h.problems)
        width = max((len(p.vm.name) for p in h.vms), default=0)
        for p in h.vms:
            head = f"  {_MARK[p.action]} {p.vm.name:<{width}}  "
            if p.action is Action.CREATE:
                out.append(head + describe_create(p, reuse_disk, start))
            elif p.action is Action.KEEP:
                out.append(head + "no change")
                out.extend(f"      {line}" for line in size_notes(p))
            else:
                out.append(head + "change:")
                out.extend(f"      {line}" for line in describe_change(p))
        for name in h.others:
            out.append(f"  ? {name}  defined on this host, not in cluster.conf (left alone)")
        for name, where in h.misplaced.items():
            out.append(f"  ? {name}  defined on this host, but cluster.conf places it on {where} (left alone)")
    out.extend(f"! not checked: {why}" for why in plan.unchecked)
    summary = (f"{plan.count(Action.CREATE)} to create, {plan.count(Action.CHANGE)} to change,"
               f" {plan.count(Action.KEEP)} unchanged")
    not_planned = sum(h.not_planned for h in plan.hosts)
    out.append(summary + f", {not_planned} not planned (see !)" if not_planned else summary)
    return "\n".join(out)
