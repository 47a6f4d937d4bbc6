"""`invoke start/stop/destroy`: one VM's domain on its physical host.

``destroy`` stops and undefines; the disk stays unless ``purge`` is given. Whatever loses data (a
running VM's power-off, purging) asks first, or is told with ``--force``: a disk, or what a running
guest has not written yet, cannot be made again.
"""

from __future__ import annotations

from collections.abc import Callable

from generators.model import Cluster, Vm
from generators.paths import seed_iso_path
from kvmconf import defined, disks, domains
from kvmconf.cli import say  # each line flushed as it is said: a log of both streams keeps their order
from kvmconf.connection import Connections, one_line
from kvmconf.errors import KvmconfError
from kvmconf.plan import Artifacts, disk_in_use, find_vm

Log = Callable[[str], None]
Confirm = Callable[[str], bool]


def _domain(cluster: Cluster, name: str, conns: Connections) -> tuple[domains.libvirt.virDomain | None, str]:
    vm = find_vm(cluster, name)
    return domains.lookup(conns.get(vm.host), name), vm.host


def _defined_elsewhere(cluster: Cluster, vm: Vm, conns: Connections) -> None:
    """Refuse to act on ``vm``, not defined on the host cluster.conf places it on, when another host has it
    (`invoke migrate` without --edit, a host= changed by hand): there it is the VM, which the task would miss."""
    found = defined.inventory(cluster, conns)
    there = [d for d in found.domains if d.name == vm.name and vm.host not in d.hosts]
    if there:
        where = ", ".join(d.where for d in there)
        raise KvmconfError(f"{vm.name} is not defined on {vm.host}, where cluster.conf places it, but on {where};"
                           f" nothing was changed: set host={min(there[0].hosts)} for it in cluster.conf to act on"
                           " it there")


def start(cluster: Cluster, name: str, conns: Connections, dry_run: bool = False, log: Log = say) -> None:
    dom, host = _domain(cluster, name, conns)
    if dom is None:
        _defined_elsewhere(cluster, cluster.vm(name), conns)
        raise KvmconfError(f"{name} is not defined on {host}; create it with `invoke provision --vm {name}`")
    if dry_run:
        log(f"{name}: already running on {host}" if domains.is_active(dom) else f"{name} on {host}: would start")
        return
    try:
        started = domains.start(dom)
    except domains.libvirt.libvirtError as err:  # its message names neither the VM nor the host
        raise KvmconfError(f"{name} on {host}: libvirt failed: {one_line(err)}") from None
    log(f"{name}: started on {host}" if started else f"{name}: already running on {host}")


def stop(cluster: Cluster, name: str, conns: Connections, force: bool = False, dry_run: bool = False,
         log: Log = say) -> None:
    """Ask the guest to shut down (ACPI), or with ``force`` power it off at once."""
    dom, host = _domain(cluster, name, conns)
    if dom is None:
        _defined_elsewhere(cluster, cluster.vm(name), conns)
        raise KvmconfError(f"{name} is not defined on {host}")
    if dry_run:
        running = domains.is_active(dom)
        log(f"{name} on {host}: would {'power off' if force else 'ask the guest to shut down'}" if running
            else f"{name}: was not running")
        return
    if force:
        log(f"{name}: powered off" if domains.power_off(dom) else f"{name}: was not running")
    else:
        log(f"{name}: shutdown requested (the guest decides when; --force powers it off)" if domains.shutdown(dom)
            else f"{name}: was not running")


def destroy(cluster: Cluster, name: str, conns: Connections, purge: bool = False,
            confirm: Confirm | None = None, dry_run: bool = False, log: Log = say) -> None:
    """Power off and undefine; with ``purge`` also remove the disk and seed ISO.

    ``confirm`` is asked, with every step listed, before anything that loses data: powering off a
    running VM, deleting a saved memory state or snapshot metadata, removing files. It is None when
    the caller already has the admin's consent (``--force``).
    """
    vm = find_vm(cluster, name)
    conn, runner = conns.get(vm.host), conns.runner(vm.host)
    dom = domains.lookup(conn, name)
    if dom is None:
        _defined_elsewhere(cluster, vm, conns)  # not "not defined" (and a purge of its host's files): it runs there
    disk = disks.disk_spec(cluster, vm)
    seed = seed_iso_path(cluster, vm)
    doomed = [path for path in (disk.path, seed) if path and runner.exists(path)] if purge else []
    running = False
    lost: list[str] = []
    steps: list[str] = []
    own = None  # the domain's own disk, when cluster.conf now puts its disk elsewhere (another disk= or disk_dir)
    if dom is not None:
        own = disk_in_use(domains.inactive_xml(dom), Artifacts(cluster).domain_xml(vm), disk.path)
        running = domains.is_active(dom)
        # What undefining deletes besides the definition (which `invoke provision` makes again): `lost` is worth
        # a question; dropping the backup checkpoints only makes the next backup a full one.
        if dom.hasManagedSaveImage(0):
            lost.append("its saved memory state")
        if snapshots := dom.snapshotNum(0):
            lost.append(f"the metadata of {snapshots} snapshot{'s' * (snapshots != 1)}")
        checkpoints = ["its backup checkpoints, so that the next backup is a full one"]
        dropped = lost + (checkpoints if dom.listAllCheckpoints() else [])
        steps += ["power off (it is running: what the guest has not written to disk is lost)"] if running else []
        steps += ["undefine" + (f" (deleting {' and '.join(dropped)})" if dropped else "")]
    steps += [f"remove {path} for good" for path in doomed]
    steps += [f"keep {own}, the disk it has, which is not where cluster.conf puts its disk"] if own and purge else []
    if not steps:
        log(f"{name}: not defined on {vm.host}" + ("" if purge else f"; its disk {disk.path} is kept if it exists"))
        return
    if dry_run:
        log(f"{name} on {vm.host}: would " + ", ".join(steps))
        return
    # Only a shut-off VM losing nothing but its definition goes without asking: that is not destructive.
    destructive = running or lost or doomed
    if destructive and confirm is not None and not confirm(f"{name} on {vm.host}: {', '.join(steps)}. Go ahead?"):
        raise KvmconfError(f"{name}: not destroyed (not confirmed; nothing was changed)")
    if dom is not None:
        if domains.power_off(dom):
            log(f"{name}: powered off")
        domains.undefine(dom, keep_nvram=not purge)
        log(f"{name}: undefined on {vm.host}")
    # Its own disk is named, not cluster.conf's path: that is where its data is, and --purge does not remove it.
    kept_own = (f"{name}: its disk {own} kept: cluster.conf puts its disk at {disk.path}, which --purge removes, not"
                f" {own}; remove {own} by hand when it is no longer wanted")
    if not purge:
        log(kept_own if own else f"{name}: disk {disk.path} kept (remove it with --purge)")
        return
    if disk.path in doomed:
        disks.remove(runner, disk)
        log(f"{name}: removed {disk.describe()}")
    if seed and seed in doomed:
        runner.remove(seed)
        log(f"{name}: removed seed ISO {seed}")
    if own:
        log(kept_own)
