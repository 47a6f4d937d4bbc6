"""site.toml's [hosts.NAME] tables: the physical hosts, their capacity, the devices they offer VMs, their setup.

Each host is reached through its libvirt URI (and SSH at its address); `fab kvm-setup` prepares it from these values.
"""

from __future__ import annotations

import re
from typing import Any

from generators.columns import IFACE_PATTERN, MAC_PATTERN, MAX_CPU, PCI_PATTERN, FieldError, parse_cpuset
from generators.errors import Problem, shown
from generators.model import PhysicalHost
from generators.site_values import IFACE_RULE, is_host_address, read_absolute_path, read_interface_name, read_matching
from generators.toml_reader import Locate, TableReader, type_of

_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S*")


def read_host(name: str, r: TableReader) -> PhysicalHost | None:
    """One [hosts.NAME] table on its own; None once its problems are recorded."""
    uri = _read_uri(r)
    address = r.get("address", str, None, "the host's IP address or DNS name")
    bad_address = address is not None and not is_host_address(address)
    if bad_address:
        r.problem("address", f"{shown(address)} is not an IP address or DNS name (expected e.g. 192.168.1.4 or"
                  " kvm0.example.org)")
    values = dict(
        uri=uri,
        ram_mb=r.positive("ram_mb"),
        cpus=r.positive("cpus", maximum=MAX_CPU + 1),  # Linux's most (NR_CPUS)
        disk_gb=r.positive("disk_gb"),
        disk_dir=read_absolute_path(r, "disk_dir", "/var/lib/libvirt/images"),
        ram_overcommit=r.positive("ram_overcommit", float, 1.0),
        cpu_overcommit=r.positive("cpu_overcommit", float, 1.0),
        disk_overcommit=r.positive("disk_overcommit", float, 1.0),
        address=address,
    )
    values.update(_read_devices(r, values["cpus"]))
    values.update(_read_setup(r))
    if any(value is None for key, value in values.items() if key != "address") or bad_address:
        return None
    keys = {key: r.locate(r.table, key) for key in ("address", "uri") if values[key] is not None}
    return PhysicalHost(name=name, where=r.locate(r.table, ""), where_key=keys, **values)


def _read_uri(r: TableReader) -> str | None:
    return read_matching(r, "uri", _URI, "is not a libvirt URI (expected e.g. qemu:///system or"
                         " qemu+ssh://root@HOST/system)", what="a libvirt URI such as qemu:///system")


def _read_devices(r: TableReader, cpus: int | None) -> dict[str, Any]:
    """What a host offers VMs beyond RAM/CPU/disk: interfaces, PCI functions, SR-IOV VFs, housekeeping CPUs, NUMA."""
    sriov, sriov_vfs = _read_sriov(r)
    return {
        "interfaces": _read_interfaces(r),
        "pci": _read_pci(r),
        "sriov": sriov,
        "sriov_vfs": sriov_vfs,
        "housekeeping_cpus": _read_housekeeping_cpus(r, cpus),
        "numa_nodes": r.positive("numa_nodes", int, 1),
    }


def _read_interfaces(r: TableReader) -> dict[str, str] | None:
    """The NICs that nic=macvtap entries may name: names, or name = MAC ("" where no MAC is given)."""
    raw = r.get("interfaces", object, [], "a list of interface names, or a table name = MAC")
    interfaces: dict[str, str] | None = {}
    items = raw.items() if isinstance(raw, dict) else ((name, "") for name in raw) if isinstance(raw, list) else None
    for name, mac in items if items is not None else ():
        if not isinstance(name, str) or not IFACE_PATTERN.fullmatch(name) or not isinstance(mac, str) or (
                mac and not MAC_PATTERN.fullmatch(mac.lower())):
            r.problem("interfaces", f"{shown(name)} = {shown(mac)} is not an interface (expected a name of"
                      f" {IFACE_RULE}, and optionally its MAC xx:xx:xx:xx:xx:xx)")
            interfaces = None
        elif interfaces is not None:
            interfaces[name] = mac.lower()
    if items is None:
        r.problem("interfaces", f"{shown(raw)} is {type_of(raw)} (expected a list of interface names, or a table"
                  " name = MAC)")
        return None
    return interfaces


def _read_pci(r: TableReader) -> tuple[str, ...] | None:
    pci = r.get("pci", list, [], "a list of PCI addresses such as \"0000:1a:00.1\"")
    bad = [item for item in pci or () if not isinstance(item, str) or not PCI_PATTERN.fullmatch(item.lower())]
    if bad:
        r.problem("pci", f"{shown(bad[0])} is not a PCI address (expected dddd:bb:ss.f, e.g. 0000:1a:00.1)")
    return None if bad or pci is None else tuple(item.lower() for item in pci)


def _read_sriov(r: TableReader) -> tuple[dict[str, int] | None, dict[str, tuple[str, ...]]]:
    """The VF count of each physical function, and the VFs' PCI addresses where they are listed."""
    sriov = r.get("sriov", dict, {}, "a table physical function = number of VFs, or = [VF PCI addresses]")
    counts: dict[str, int] | None = {}
    vfs: dict[str, tuple[str, ...]] = {}
    for pf, value in (sriov or {}).items():
        if not IFACE_PATTERN.fullmatch(pf):  # it names the host's NIC and the libvirt network vf-<pf>
            r.problem("sriov", f"{shown(pf)} is not an interface name (expected {IFACE_RULE})")
            counts = None
        elif isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 256:
            if counts is not None:
                counts[pf] = value
        elif isinstance(value, list) and value and all(isinstance(a, str) and PCI_PATTERN.fullmatch(a.lower())
                                                       for a in value):
            if counts is not None:
                counts[pf] = len(value)
                vfs[pf] = tuple(a.lower() for a in value)
        else:
            r.problem("sriov", f"{pf} = {shown(value)} is not a VF count (expected a number of VFs 1-256, or the"
                      " list of the VFs' PCI addresses)")
            counts = None
    return counts, vfs


def _read_housekeeping_cpus(r: TableReader, cpus: int | None) -> tuple[int, ...] | None:
    """The CPUs for emulator threads, never pinned to a vCPU (cpuset=); () for none."""
    housekeeping = r.get("housekeeping_cpus", str, "", "a CPU list such as \"0-1\"")
    if not housekeeping:
        return ()
    try:
        chosen = parse_cpuset(housekeeping)
    except FieldError as err:
        r.problem("housekeeping_cpus", f"{shown(housekeeping)} {err}")
        return None
    if chosen and cpus is not None and max(chosen) >= cpus:
        r.problem("housekeeping_cpus", f"{shown(housekeeping)} names CPUs the host does not have (expected CPUs"
                  f" 0-{cpus - 1})")
        return None
    return chosen


def _read_setup(r: TableReader) -> dict[str, Any]:
    """How `fab kvm-setup` prepares the host: the network stack for the bridges, their uplink NIC, nested virt."""
    stack = r.get("network_stack", str, "ifupdown", "ifupdown, netplan or networkmanager")
    if stack is not None and stack not in ("ifupdown", "netplan", "networkmanager"):
        r.problem("network_stack", f"{shown(stack)} is not a network stack (expected ifupdown, netplan or"
                  " networkmanager)")
        stack = None
    uplink = read_interface_name(r, "uplink", "the interface the bridges are on, such as eno1", "")
    return {"network_stack": stack, "uplink": uplink, "nested": r.get("nested", bool, False)}


def check_host_addresses_apart(hosts: dict[str, PhysicalHost | None], locate: Locate,
                               problems: list[Problem]) -> None:
    """Refuse a host whose address is an earlier host's: the DNS would give one IP two names (two PTRs), and the
    Nagios backup check of one host would reach the other."""
    earlier: dict[str, str] = {}  # the address as compared (an IP normalised, a name in lower case): host
    for name, host in hosts.items():
        if host is None or host.address is None:
            continue
        key = str(host.ip) if host.ip is not None else host.address.lower().rstrip(".")
        other = earlier.setdefault(key, name)
        if other != name:
            TableReader({}, f"hosts.{name}", locate, problems).problem(
                "address", f"{shown(host.address)} is the address of host {other!r} too (expected each host's own"
                " address)")
