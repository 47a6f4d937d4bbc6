"""`invoke capacity`: per physical host, what cluster.conf commits against what site.toml says it has.

RAM, vCPUs and disk are shown as committed / capacity and against the overcommit limit that
placement and validation use (capacity x overcommit); then the CPUs pinned (and to whom), the
housekeeping CPUs, the SR-IOV VFs used per physical function and the PCI functions passed
through. With connections, each host also says how many of the VMs cluster.conf places on it its libvirt
has defined and runs, so an unreachable host shows up here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from generators.domain_xml import cpu_list
from generators.model import Cluster, NicKind
from kvmconf.connection import Connections, failure_noted
from kvmconf.plan import foreign_domains


@dataclass
class Resource:
    name: str  # "RAM", "vCPUs", "disk"
    unit: str
    committed: int
    size: int
    overcommit: float

    @property
    def limit(self) -> float:
        return self.size * self.overcommit

    def line(self) -> str:
        share = 100 * self.committed / self.limit if self.limit else 0.0
        over = "  OVER THE LIMIT" if self.committed > self.limit else ""
        return (f"{self.name:<6}{self.committed:>8} {self.unit:<3} of {self.size} (limit {self.limit:g} at overcommit"
                f" {self.overcommit:g}: {share:.0f}% used){over}")


@dataclass
class HostCapacity:
    host: str
    uri: str
    vms: list[str]
    resources: list[Resource]
    pinned: dict[int, str] = field(default_factory=dict)  # host CPU -> VM
    housekeeping: tuple[int, ...] = ()
    vfs: dict[str, tuple[int, int]] = field(default_factory=dict)  # PF -> (used, count)
    pci: dict[str, str] = field(default_factory=dict)  # PCI function -> VM
    defined: int | None = None  # of the VMs cluster.conf places here, those libvirt has (None: not asked, or failed)
    running: int | None = None
    # Domains defined here that cluster.conf does not place here (made by hand, or moved by a migrate without --edit):
    # how many, how many of them run and the RAM (MB) those have. Nothing above counts them.
    others: tuple[int, int, int] = (0, 0, 0)
    error: str | None = None  # the host could not be reached, or a libvirt call failed there


def capacity(cluster: Cluster, conns: Connections | None = None, hosts: Sequence[str] = ()) -> list[HostCapacity]:
    result = []
    for name in sorted(hosts or cluster.site.hosts):
        h = cluster.site.hosts[name]
        vms = [vm for vm in cluster.vms if vm.host == name]
        report = HostCapacity(name, h.uri, [vm.name for vm in vms], [
            Resource("RAM", "MB", sum(vm.ram_mb for vm in vms), h.ram_mb, h.ram_overcommit),
            Resource("vCPUs", "", sum(vm.cpus for vm in vms), h.cpus, h.cpu_overcommit),
            Resource("disk", "GB", sum(vm.disk.size_gb for vm in vms), h.disk_gb, h.disk_overcommit),
        ], housekeeping=h.housekeeping_cpus)
        report.vfs = {pf: (0, count) for pf, count in sorted(h.sriov.items())}
        for vm in vms:
            report.pinned.update(dict.fromkeys(vm.cpuset, vm.name))
            for nic in vm.nics:
                if nic.kind is NicKind.VF:
                    used, count = report.vfs[nic.source]
                    report.vfs[nic.source] = (used + 1, count)
                    if nic.vf is not None:
                        report.pci[h.sriov_vfs[nic.source][nic.vf]] = vm.name
                elif nic.kind is NicKind.PCI:
                    report.pci[nic.source] = vm.name
        if conns is not None:
            with failure_noted(report):
                listed = conns.get(name).listAllDomains()
                ours = [dom for dom in listed if dom.name() in report.vms]
                report.defined = len(ours)
                report.running = sum(1 for dom in ours if dom.isActive())
                unknown, misplaced = foreign_domains(cluster, name, conns, [dom.name() for dom in listed])
                others = [dom for dom in listed if dom.name() in unknown or dom.name() in misplaced]
                running = [dom for dom in others if dom.isActive()]
                report.others = (len(others), len(running), sum(dom.info()[1] for dom in running) // 1024)
        result.append(report)
    return result


def format_capacity(hosts: list[HostCapacity]) -> str:
    out = []
    for h in hosts:
        count = f"{len(h.vms)} VM{'s' * (len(h.vms) != 1)} in cluster.conf"
        if h.error:
            count += f"; {h.error}"  # it names the host and what failed: unreachable, or a libvirt call
        elif h.defined is not None:
            count += f", {h.defined} defined, {h.running} running"
            defined, running, ram_mb = h.others
            if defined:
                count += (f"; and {defined} other domain{'s' * (defined != 1)} not placed here by cluster.conf, not"
                          f" counted below: {running} running with {ram_mb} MB RAM (see `invoke status`)")
        out.append(f"{h.host} ({h.uri}): {count}")
        out.extend("  " + r.line() for r in h.resources)
        by_vm: dict[str, list[int]] = {}
        for cpu, vm in sorted(h.pinned.items()):
            by_vm.setdefault(vm, []).append(cpu)
        pinned = ", ".join(f"{cpu_list(tuple(cpus))} ({vm})" for vm, cpus in by_vm.items()) or "none"
        out.append(f"  pinned CPUs: {pinned}; housekeeping CPUs: {cpu_list(h.housekeeping) or 'none'}")
        if h.vfs:
            out.append("  SR-IOV VFs: " + ", ".join(f"{pf} {used}/{count}" for pf, (used, count) in h.vfs.items()))
        if h.pci:
            out.append("  PCI passthrough: " + ", ".join(f"{address} ({vm})" for address, vm in sorted(h.pci.items())))
    return "\n".join(out)
