"""`invoke status`: a table per physical host of what runs, with drift from cluster.conf.

Drift compares what libvirt has (the persistent definition, and the live values of a running
domain) with cluster.conf: RAM, vCPUs, MAC, disk size, autostart, and anything else of the
generated definition (then `invoke plan` shows the diff).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field

import libvirt

from generators.model import Cluster, Vm
from kvmconf import disks, domains
from kvmconf.connection import Connections, failure_noted
from kvmconf.plan import Artifacts, foreign_domains

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
HEADERS = ("VM", "STATE", "IP", "RAM MB", "VCPUS", "DISK GB (virt/alloc)", "AUTOSTART", "DRIFT FROM CLUSTER.CONF")


@dataclass
class VmStatus:
    name: str
    state: str
    ip: str = "-"
    ram_mb: int | None = None
    cpus: int | None = None
    disk_virtual: float | None = None  # GiB
    disk_allocated: float | None = None
    autostart: bool | None = None
    drift: list[str] = field(default_factory=list)

    def row(self) -> tuple[str, ...]:
        disk = "-" if self.disk_virtual is None else f"{self.disk_virtual:g}/{self.disk_allocated or 0:.2f}"
        return (self.name, self.state, self.ip, _opt(self.ram_mb), _opt(self.cpus), disk,
                "-" if self.autostart is None else ("yes" if self.autostart else "no"),
                "; ".join(self.drift) or "none")


def _on(flag: bool | None) -> str:
    return "on" if flag else "off"


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


@dataclass
class HostStatus:
    host: str
    uri: str
    vms: list[VmStatus] = field(default_factory=list)
    error: str | None = None


def _config_values(xml: str) -> tuple[int, int, list[str]]:
    """RAM (MB), vCPUs and MACs of a persistent definition."""
    root = ET.fromstring(xml)
    memory = root.find("memory")
    kib = int(memory.text or 0) if memory is not None else 0
    vcpu = root.find("vcpu")
    cpus = int(vcpu.text or 0) if vcpu is not None else 0
    macs = [m.get("address", "").lower() for m in root.iterfind("devices/interface/mac")]
    return kib // 1024, cpus, macs


def vm_status(cluster: Cluster, vm: Vm, conn: libvirt.virConnect, conns: Connections, artifacts: Artifacts,
              aliases: dict[tuple[str, str], str]) -> VmStatus:
    dom = domains.lookup(conn, vm.name)
    status = VmStatus(vm.name, "not defined", str(vm.ip))
    if dom is None:
        status.drift.append("not provisioned")
        return status
    state = dom.state()[0]
    status.state = _STATES.get(state, str(state))
    live_xml = domains.inactive_xml(dom)
    ram_mb, cpus, macs = _config_values(live_xml)
    status.ram_mb, status.cpus, status.autostart = ram_mb, cpus, bool(dom.autostart())
    drift = status.drift
    if ram_mb != vm.ram_mb:
        drift.append(f"RAM {ram_mb} MB (cluster.conf: {vm.ram_mb})")
    if cpus != vm.cpus:
        drift.append(f"vCPUs {cpus} (cluster.conf: {vm.cpus})")
    if vm.mac not in macs:
        drift.append(f"MAC {', '.join(macs) or 'none'} (cluster.conf: {vm.mac})")
    if domains.is_active(dom):
        _, max_kib, _, live_cpus, _ = dom.info()
        if max_kib // 1024 != ram_mb:
            drift.append(f"running with {max_kib // 1024} MB RAM until restarted")
        if live_cpus != cpus:
            drift.append(f"running with {live_cpus} vCPUs until restarted")
        # A MAC changed with `provision --apply`: the guest keeps its old NIC, which the DHCP reservation made for the
        # new MAC does not match, until it is started again.
        running_macs = _config_values(dom.XMLDesc(0))[2]
        if old := [mac for mac in running_macs if mac not in macs]:
            new = [mac for mac in macs if mac not in running_macs]
            drift.append(f"running with MAC {', '.join(old)} until restarted"
                         + (f" (definition: {', '.join(new)})" if new else ""))
        seen = _seen_ips(dom, vm.mac)
        if seen and str(vm.ip) not in seen:
            status.ip = f"{vm.ip} (seen: {', '.join(seen)})"
            drift.append(f"IP {', '.join(seen)} seen (cluster.conf: {vm.ip})")
    if status.autostart != vm.autostart:
        drift.append(f"autostart {_on(status.autostart)} (cluster.conf: {_on(vm.autostart)})")
    disk = disks.disk_spec(cluster, vm)
    try:
        capacity, allocation, _ = dom.blockInfo(disk.path)
        status.disk_virtual, status.disk_allocated = capacity / disks.GIB, allocation / disks.GIB
        if capacity != vm.disk.size_gb * disks.GIB:
            drift.append(f"disk {capacity / disks.GIB:g} GB (cluster.conf: {vm.disk.size_gb})")
    except libvirt.libvirtError:
        exists = disks.exists(conns.runner(vm.host), disk)
        drift.append(f"disk {disk.path} {'not attached' if exists else 'missing'}")
    if not drift and domains.definition_diff(live_xml, domains.with_uuid(artifacts.domain_xml(vm), dom.UUIDString()),
                                             aliases, vm.name):
        drift.append("definition differs (see `invoke plan`)")
    return status


def _seen_ips(dom: libvirt.virDomain, mac: str) -> list[str]:
    """Addresses of the VM's MAC in the host's ARP table: no guest agent needed, running guests only."""
    try:
        interfaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)
    except libvirt.libvirtError:
        return []
    return sorted(a["addr"] for i in interfaces.values() if (i.get("hwaddr") or "").lower() == mac
                  for a in i.get("addrs") or [])


def status(cluster: Cluster, conns: Connections, hosts: Sequence[str] = ()) -> list[HostStatus]:
    """A report per host (all of site.toml's when ``hosts`` is empty); one that fails says why, the others are shown."""
    artifacts = Artifacts(cluster)
    result = []
    for host in sorted(hosts or cluster.site.hosts):
        hstatus = HostStatus(host, conns.uri(host))
        result.append(hstatus)
        with failure_noted(hstatus):
            hstatus.vms = host_vms(cluster, host, conns, artifacts)
    return result


def host_vms(cluster: Cluster, host: str, conns: Connections, artifacts: Artifacts) -> list[VmStatus]:
    """The VMs cluster.conf places on ``host``, then the domains there that it does not."""
    conn = conns.get(host)
    aliases = domains.machine_aliases(conn)
    vms = [vm_status(cluster, vm, conn, conns, artifacts, aliases) for vm in cluster.vms if vm.host == host]
    listed = {dom.name(): dom for dom in conn.listAllDomains()}
    others, misplaced = foreign_domains(cluster, host, conns, listed)
    # The listed objects, not a lookup by name: one call less per domain, and the domain listed is the one shown.
    vms += [VmStatus(name, state, drift=["not in cluster.conf"])
            for name in others if (state := state_of(listed[name]))]
    vms += [VmStatus(name, state, drift=[f"cluster.conf places it on {where}"])
            for name, where in misplaced.items() if (state := state_of(listed[name]))]
    return vms


def state_of(dom: libvirt.virDomain) -> str | None:
    """The domain's state; None when it was undefined after it was listed (it is not there to show any more)."""
    try:
        state = dom.state()[0]
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    return _STATES.get(state, str(state))


def format_status(hosts: list[HostStatus]) -> str:
    out = []
    for h in hosts:
        out.append(f"{h.host} ({h.uri}):")
        if h.error:
            out.append(f"  ! {h.error}")  # it names the host and what failed: unreachable, or a libvirt call
            continue
        rows = [HEADERS, *(vm.row() for vm in h.vms)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS) - 1)]
        for row in rows:
            out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
        if not h.vms:
            out.append("  (no VMs)")
    return "\n".join(out)
