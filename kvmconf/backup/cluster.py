"""What the tasks call: back up the VMs of cluster.conf that run on this machine, restore one, report status.

The backup writes local files, so it runs on each physical host (cron) for the VMs whose host's
libvirt URI is local here (qemu:///system, or the lab's socket); with --all the VMs of other hosts
are left to their own host's cron.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from pathlib import Path

import libvirt

from generators.crontab import GRACE, max_interval
from generators.model import Cluster, Vm
from kvmconf.backup.engine import Outcome, Settings, backup_vm
from kvmconf.backup.report import VmStatus, vm_status
from kvmconf.backup.restore import restore
from kvmconf.backup.store import VmStore
from kvmconf.connection import Connections
from kvmconf.domains import lookup
from kvmconf.plan import find_vm, vms_or_all
from kvmconf.runner import runner_for_uri

Log = Callable[[str], None]


def settings(cluster: Cluster, progress: bool) -> Settings:
    b = cluster.site.backup
    return Settings(Path(b.dir), b.full_every, Path(b.nas_dir) if b.nas_dir else None, progress)


def keep_of(cluster: Cluster, vm: Vm) -> int:
    return max(1, vm.keep if vm.keep is not None else cluster.site.backup.keep)


def is_local(cluster: Cluster, host: str) -> bool:
    h = cluster.site.hosts[host]
    return runner_for_uri(h.uri).ssh is None or host == socket.gethostname().split(".")[0]


def backup(cluster: Cluster, names: list[str], all_vms: bool, conns: Connections, progress: bool,
           log: Log = print) -> list[Outcome]:
    vms_or_all(names, all_vms, "every backup=yes VM whose host is this machine")
    chosen = [vm for vm in cluster.vms if vm.backup and is_local(cluster, vm.host)] if all_vms else \
        [find_vm(cluster, n) for n in names]
    outcomes = []
    for vm in chosen:
        dom = lookup(conns.get(vm.host), vm.name)
        if dom is None:
            if all_vms:
                log(f"{vm.name}: not defined on {vm.host}: skipped")
                continue
            outcome = Outcome(vm.name, False, error=f"not defined on {vm.host}")
        else:
            outcome = backup_vm(dom, settings(cluster, progress), keep_of(cluster, vm), log)
        outcomes.append(outcome)
        log(describe(outcome))
    return outcomes


def describe(outcome: Outcome) -> str:
    if not outcome.ok or outcome.manifest is None:
        return f"{outcome.vm}: BACKUP FAILED: {outcome.error}"
    m = outcome.manifest
    notes = "".join(f"\n  {n}" for n in m.notes)
    return (f"{m.vm}: {m.kind} backup {m.time} ok, {m.stored / 2**20:.1f} MiB stored in {m.seconds:.1f} s"
            f" ({', '.join(d.dev for d in m.disks)}){notes}" + (f"\n  NAS: {outcome.error}" if outcome.error else ""))


def restore_vm(cluster: Cluster, name: str, at: str | None, to: Path | None, force: bool, conns: Connections,
               log: Log = print) -> list[Path]:
    vm = find_vm(cluster, name)
    dom: libvirt.virDomain | None = None
    if to is None:
        dom = lookup(conns.get(vm.host), vm.name)
    return restore(VmStore(Path(cluster.site.backup.dir), vm.name), at, to, dom, force, log)


def status_rows(cluster: Cluster, names: list[str]) -> tuple[list[VmStatus], dt.timedelta]:
    """Status of the named VMs and the age the schedule allows.

    Default: the VMs with backup=yes of this machine's hosts, as `backup --all` takes them; another
    host's VMs would only show "no backup yet" here, their backups being on that host.
    """
    b = cluster.site.backup
    vms = [find_vm(cluster, n) for n in names] if names else \
        [v for v in cluster.vms if v.backup and is_local(cluster, v.host)]
    now = dt.datetime.now(dt.UTC)
    rows = [vm_status(Path(b.dir), Path(b.nas_dir) if b.nas_dir else None, vm.name, now) for vm in vms]
    return rows, max_interval(b.schedule) + GRACE
