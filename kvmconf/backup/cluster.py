"""What the tasks call: back up the VMs of cluster.conf that run on this machine, restore one, report status.

The backup writes local files, so it runs on each physical host (cron) for the VMs of the hosts of
site.toml that are this machine (:func:`this_machines_hosts`); with --all the VMs of other hosts are
left to their own host's cron.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import traceback
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import libvirt

from generators.crontab import GRACE, max_interval
from generators.model import Cluster, PhysicalHost, Vm, uri_host
from kvmconf.backup import journal
from kvmconf.backup.engine import Outcome, Settings, backup_vm
from kvmconf.backup.nas import NasFailed, check_mounted
from kvmconf.backup.report import VmStatus, backup_dir_missing, vm_status
from kvmconf.backup.restore import restore
from kvmconf.backup.store import VmStore, utc_now
from kvmconf.backup.verify import verify
from kvmconf.cli import say
from kvmconf.connection import Connections
from kvmconf.domains import lookup
from kvmconf.errors import HostUnreachable, KvmconfError
from kvmconf.interfaces import interface_addresses
from kvmconf.plan import find_vm, find_vms, vms_or_all
from kvmconf.signals import sigterm_as_interrupt

Log = Callable[[str], None]


def settings(cluster: Cluster, progress: bool) -> Settings:
    b = cluster.site.backup
    return Settings(Path(b.dir), b.full_every, Path(b.nas_dir) if b.nas_dir else None, progress, Path(b.scratch_dir))


def keep_of(cluster: Cluster, vm: Vm) -> int:
    return max(1, vm.keep if vm.keep is not None else cluster.site.backup.keep)


# The rule, said where it applies (the error of `backup --all`, README "Backups").
RULE = ("a host of site.toml is this machine when its [hosts.<name>] name is this machine's hostname (without domain),"
        " or its address or its uri's host is this machine's name or one of its addresses; only when no host is"
        " named so, every host with a local uri (qemu:///system) is")


@dataclass(frozen=True)
class Machine:
    """The machine a backup runs on, as site.toml may name it: its hostname and IP addresses (loopback left out)."""

    hostname: str
    addresses: Collection[str] = ()

    @classmethod
    def here(cls) -> Machine:
        try:  # link-local addresses name no machine in site.toml: they repeat on every link
            found = {str(a) for addresses in interface_addresses().values() for a in addresses
                     if not (a.is_loopback or a.is_link_local)}
        except (KvmconfError, OSError):  # no `ip`: the hostname alone can still name this machine
            found = set()
        return cls(socket.gethostname(), frozenset(found))

    def is_called(self, name: str) -> bool:
        """Whether a name or IP address from site.toml (an address, a URI's host) is this machine.

        A DNS name is compared by its first label, as [hosts.<name>] is: kvm1.phys.example.org is machine kvm1.
        """
        try:
            address = ip_address(name)
        except ValueError:  # a name
            return name.lower().rstrip(".").split(".")[0] == self.short_name
        return any(ip_address(own) == address for own in self.addresses)

    @property
    def short_name(self) -> str:
        return self.hostname.lower().split(".")[0]

    def describe(self) -> str:
        return f"hostname {self.hostname}, addresses {', '.join(sorted(self.addresses)) or 'none found'}"


def names_machine(name: str, host: PhysicalHost, machine: Machine) -> bool:
    """Whether site.toml names ``machine`` as the host ``name``: by its key, its address or its URI's host."""
    uri_machine = uri_host(host.uri)
    return (name.lower() == machine.short_name or (host.address is not None and machine.is_called(host.address))
            or (uri_machine is not None and machine.is_called(uri_machine)))


def this_machines_hosts(cluster: Cluster, machine: Machine) -> list[str]:
    """The hosts of site.toml that are ``machine`` (see RULE), in site.toml's order.

    A local URI means whichever machine uses it, so in the example kvm0's qemu:///system would be kvm1 too when
    cron runs there: a host named as this machine wins over it. The lab makes every URI local (a socket each)
    and names no host as this machine, so there every host is.
    """
    hosts = cluster.site.hosts
    named = [name for name, host in hosts.items() if names_machine(name, host, machine)]
    return named or [name for name, host in hosts.items() if uri_host(host.uri) is None]


def require_this_machines_hosts(cluster: Cluster, machine: Machine, task: str) -> list[str]:
    """this_machines_hosts, refusing none: a cron job that backs up nothing must fail, not succeed silently."""
    hosts = this_machines_hosts(cluster, machine)
    if not hosts:
        listed = "; ".join(f"{name} (uri {h.uri}{f', address {h.address}' if h.address else ''})"
                           for name, h in cluster.site.hosts.items())
        raise KvmconfError(f"{task}: no host of {cluster.site.path} is this machine ({machine.describe()}): {RULE}."
                           f" Its hosts: {listed}. Name this machine in site.toml ([hosts.<its hostname>], or its"
                           " address), or run this on a host of it")
    return hosts


def backup(cluster: Cluster, names: list[str], all_vms: bool, conns: Connections, progress: bool,
           log: Log = say, machine: Machine | None = None) -> list[Outcome]:
    """Back up the named VMs, or with ``all_vms`` the backup=yes VMs of this machine's hosts (``machine``: here).

    Each VM on its own: one VM's failure, however unexpected, is its outcome and the next VM is backed up.
    Ctrl-C or SIGTERM ends the run, recorded as interrupted for the VM it stopped.
    """
    chosen = _chosen(cluster, names, all_vms, machine or Machine.here(), "backup")
    log(f"backup: started {now_text()}, pid {os.getpid()}: {', '.join(vm.name for vm in chosen) or 'no VM'}")
    outcomes: list[Outcome] = []
    with sigterm_as_interrupt():  # also between two VMs: said and recorded, not a silent end
        try:
            for vm in chosen:
                outcome = _backup_isolated(cluster, vm, all_vms, conns, progress, log)
                if outcome is not None:
                    outcomes.append(outcome)
                    log(describe(outcome))
        except KeyboardInterrupt:
            done = ", ".join(o.vm for o in outcomes) or "none"
            log(f"backup: interrupted {now_text()} (Ctrl-C or SIGTERM); finished before it: {done}")
            raise
    failed = [o.vm for o in outcomes if not o.ok or o.error]
    log(f"backup: finished {now_text()}: {len(outcomes) - len(failed)} ok"
        + (f", failed: {', '.join(failed)}" if failed else ""))
    return outcomes


def _chosen(cluster: Cluster, names: list[str], all_vms: bool, machine: Machine, task: str) -> list[Vm]:
    """The named VMs, each once, or with ``all_vms`` the backup=yes VMs of ``machine``'s hosts: their backups are
    that machine's files."""
    vms_or_all(names, all_vms, "every backup=yes VM whose host is this machine")
    if all_vms:
        hosts = require_this_machines_hosts(cluster, machine, f"{task} --all")
        return [vm for vm in cluster.vms if vm.backup and vm.host in hosts]
    chosen = find_vms(cluster, list(dict.fromkeys(names)))  # every unknown name in one error; each VM once
    require_here(cluster, chosen, machine, task)
    return chosen


def verify_backups(cluster: Cluster, names: list[str], all_vms: bool, log: Log = say,
                   machine: Machine | None = None) -> list[str]:
    """Read back every restore point of the chosen VMs (as `backup` chooses them), and their NAS copies when the
    share is mounted, against their checksums; the VMs with a damaged point (recorded: see verify.py)."""
    chosen = _chosen(cluster, names, all_vms, machine or Machine.here(), "backup-verify")
    require_backup_dir(cluster)
    stores = [("", Path(cluster.site.backup.dir))]
    if cluster.site.backup.nas_dir:
        try:
            stores.append(("NAS: ", _nas_root(cluster)))
        except NasFailed as err:
            log(f"backup-verify: the NAS copies are not verified: {err}")
    damaged: list[str] = []
    for label, root in stores:
        for vm in chosen:
            if verify(VmStore(root, vm.name), utc_now(), _prefixed(log, label)):
                damaged.append(label + vm.name)
    log(f"backup-verify: finished {now_text()}: " + (f"damaged: {', '.join(damaged)}" if damaged else "all intact"))
    return damaged


def _prefixed(log: Log, prefix: str) -> Log:
    return lambda line: log(prefix + line)


def _backup_isolated(cluster: Cluster, vm: Vm, all_vms: bool, conns: Connections, progress: bool,
                     log: Log) -> Outcome | None:
    """_backup_one; a failure of any kind is this VM's outcome and last run, an interrupt is recorded, then ends it."""
    try:
        return _backup_one(cluster, vm, all_vms, conns, progress, log)
    except KeyboardInterrupt:
        _record_failure(cluster, vm, "interrupted (Ctrl-C or SIGTERM) before it finished")
        raise
    except HostUnreachable as err:  # that host's other VMs fail alike; the other hosts' still run
        outcome = Outcome(vm.name, False, error=str(err))
    except Exception as err:  # a bug: this VM's failure, with its traceback, and the next VMs still run
        traceback.print_exc()
        outcome = Outcome(vm.name, False, error=f"unexpected error {type(err).__name__}: {err} (a bug: its"
                                                " traceback is on stderr, in the cron log)")
    _record_failure(cluster, vm, outcome.error)
    return outcome


def _backup_one(cluster: Cluster, vm: Vm, all_vms: bool, conns: Connections, progress: bool,
                log: Log) -> Outcome | None:
    """One VM's outcome; None when --all skips it (not defined on its host)."""
    dom = lookup(conns.get(vm.host), vm.name)
    if dom is None:
        if all_vms:
            log(f"{vm.name}: not defined on {vm.host}: skipped")
            return None
        outcome = Outcome(vm.name, False, error=f"not defined on {vm.host}")
        _record_failure(cluster, vm, outcome.error)
        return outcome
    return backup_vm(dom, settings(cluster, progress), keep_of(cluster, vm), log)


def _record_failure(cluster: Cluster, vm: Vm, error: str) -> None:
    """last-run.json of a VM whose backup did not reach its own record (backup_vm's), for backup-status.

    Also of a VM never backed up (its directory is made): its first backup failing must not read "no backup yet".
    Never the [backup] dir itself: missing, it is a disk not mounted, and backup-status says so.
    """
    vm_dir = VmStore(Path(cluster.site.backup.dir), vm.name).dir
    try:
        vm_dir.mkdir(exist_ok=True)
    except OSError:  # no [backup] dir, or it cannot be written: nowhere to record it
        return
    entry = {"time": utc_now(), "ok": False, "error": error, "point": None}
    with suppress(OSError):  # a full disk must not hide the failure being reported
        journal.write(vm_dir, entry, journal.LAST_RUN, durable=False)


def now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def require_here(cluster: Cluster, vms: list[Vm], machine: Machine, task: str) -> None:
    """Refuse VMs of another host: their backups are local files of that host, and their NBD socket is there."""
    hosts = this_machines_hosts(cluster, machine)
    elsewhere = [vm for vm in vms if vm.host not in hosts]
    if elsewhere:
        raise KvmconfError("; ".join(f"{task} {vm.name}: its host {vm.host} is not this machine" for vm in elsewhere)
                           + f" ({machine.describe()}; {RULE}): run it on "
                           + ", ".join(sorted({vm.host for vm in elsewhere})))


def describe(outcome: Outcome) -> str:
    if not outcome.ok or outcome.manifest is None:
        return f"{outcome.vm}: BACKUP FAILED: {outcome.error}"
    m = outcome.manifest
    notes = "".join(f"\n  {n}" for n in m.notes)
    # The point is made; what failed after it (NAS copy, retention, ...) is named by the step the engine gives.
    step = outcome.failed_step or "a step after the point was made"
    after = f"\n  {step} failed: {outcome.error}" if outcome.error else ""
    return (f"{m.vm}: {m.kind} backup {m.time} ok, {m.stored / 2**20:.1f} MiB stored in {m.seconds:.1f} s"
            f" ({', '.join(d.dev for d in m.disks)}){notes}{after}")


def restore_vm(cluster: Cluster, name: str, at: str | None, to: Path | None, force: bool, conns: Connections,
               log: Log = say, machine: Machine | None = None, from_nas: bool = False) -> list[Path]:
    """Restore `name` from its points in [backup] dir, or with `from_nas` from their copies in nas_dir (the local
    backup disk lost): see restore.restore."""
    vm = find_vm(cluster, name)
    local = VmStore(Path(cluster.site.backup.dir), vm.name)  # the lock and the in-place records, from NAS copies too
    store = VmStore(_nas_root(cluster), vm.name) if from_nas else local
    dom: libvirt.virDomain | None = None
    if to is None:  # in place: the VM's disks are files of its host, swapped here
        require_here(cluster, [vm], machine or Machine.here(), "restore")
        dom = lookup(conns.get(vm.host), vm.name)
    return restore(store, at, to, dom, force, log, home=local)


def _nas_root(cluster: Cluster) -> Path:
    """nas_dir, once it is the mounted share (not the empty directory of an unmounted one, nor the local disk)."""
    b = cluster.site.backup
    if not b.nas_dir:
        raise KvmconfError("--nas: site.toml's [backup] has no nas_dir: there are no NAS copies to restore from")
    check_mounted(Path(b.dir), Path(b.nas_dir))
    return Path(b.nas_dir)


def require_backup_dir(cluster: Cluster) -> None:
    """Refuse a missing [backup] dir: backup-status would show every VM as without backup, and exit 0."""
    missing = backup_dir_missing(Path(cluster.site.backup.dir))
    if missing:
        raise KvmconfError(missing)


def status_rows(cluster: Cluster, names: list[str], machine: Machine | None = None
                ) -> tuple[list[VmStatus], dt.timedelta]:
    """Status of the named VMs and the age the schedule allows.

    Default: the VMs with backup=yes of this machine's hosts (``machine``: here), as `backup --all` takes them;
    another host's VMs would only show "no backup yet" here, their backups being on that host.
    """
    b = cluster.site.backup
    if names:
        vms = find_vms(cluster, list(dict.fromkeys(names)))
    else:
        hosts = require_this_machines_hosts(cluster, machine or Machine.here(), "backup-status")
        vms = [v for v in cluster.vms if v.backup and v.host in hosts]
    now = dt.datetime.now(dt.UTC)
    rows = [vm_status(Path(b.dir), Path(b.nas_dir) if b.nas_dir else None, vm.name, now) for vm in vms]
    return rows, max_interval(b.schedule) + GRACE
