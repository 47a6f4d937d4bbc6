"""What every host of the cluster has defined: domain names and their MACs, one listing per libvirt daemon per run.

Provisioning checks a VM against it before creating it: a VM that is defined on another host already
(host=auto placement moved it when another line changed, or an admin edited host=), or whose MAC a domain
of another name holds (a VM renamed in cluster.conf while its old domain is still defined), would
otherwise run twice, two guests with one MAC and one IP address.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from generators.model import Cluster, Vm
from kvmconf import domains
from kvmconf.connection import Connections
from kvmconf.errors import HostUnreachable


@dataclass(frozen=True)
class Domain:
    name: str
    hosts: frozenset[str]  # the hosts whose URI is the daemon it is defined on (in a lab, several)
    macs: frozenset[str]  # lower case, of every NIC

    @property
    def where(self) -> str:
        return "/".join(sorted(self.hosts))


@dataclass
class Inventory:
    domains: list[Domain] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # host: why its daemon could not be listed

    def names_on(self, host: str) -> list[str]:
        return sorted(d.name for d in self.domains if host in d.hosts)

    def clashes(self, vm: Vm) -> list[str]:
        """Why creating ``vm`` on its host would make a second copy of a defined guest ([] if it would not)."""
        problems = []
        elsewhere = [d for d in self.domains if d.name == vm.name and vm.host not in d.hosts]
        if elsewhere:
            there = ", ".join(d.where for d in elsewhere)
            host = min(elsewhere[0].hosts)  # a value host= takes (where joins the hosts sharing one daemon)
            problems.append(
                f"{vm.name}: defined on {there} already, but cluster.conf places it on {vm.host}; it is not created a"
                f" second time: to move it, set host={host} for it in cluster.conf again and run `invoke"
                f" migrate --vm {vm.name} --to {vm.host} --edit`; to keep it there, set host={host}; or"
                f" undefine it on {there} if that copy is unwanted")
        for mac in macs_of_vm(vm):
            holders = [d for d in self.domains if d.name != vm.name and mac in d.macs]
            problems += [f"{vm.name}: its MAC {mac} belongs to domain {d.name!r} defined on {d.where}; it is not"
                         f" created beside it (two guests with one MAC and IP): if {d.name} is an old name of"
                         f" {vm.name}, undefine it on {d.where} first, else give {vm.name} another MAC"
                         for d in holders]
        return problems


def macs_of_vm(vm: Vm) -> list[str]:
    """Every MAC cluster.conf gives the VM: its primary NIC's and its extra NICs' (a PCI passthrough NIC has none)."""
    return [vm.mac, *(nic.mac for nic in vm.nics if nic.mac)]


def macs_of_xml(xml: str) -> frozenset[str]:
    return frozenset(m.get("address", "").lower() for m in ET.fromstring(xml).iterfind("devices/interface/mac"))


def inventory(cluster: Cluster, conns: Connections, unreachable: dict[str, str] | None = None) -> Inventory:
    """Every domain on every host of site.toml, each daemon listed once; a daemon that cannot be reached is noted.

    ``unreachable``: hosts known to be so already (host: why), not tried a second time.
    """
    found = Inventory(unreachable=dict(unreachable or {}))
    failed = {conns.uri(host): why for host, why in found.unreachable.items()}
    listed: set[str] = set()
    for host in sorted(cluster.site.hosts):
        uri = conns.uri(host)
        if uri in failed:
            found.unreachable.setdefault(host, failed[uri])
            continue
        if uri in listed:
            continue
        listed.add(uri)
        try:
            conn = conns.get(host)
        except HostUnreachable as err:
            failed[uri] = found.unreachable[host] = str(err)
            continue
        sharing = frozenset(conns.hosts_sharing_uri(host))
        found.domains += [Domain(dom.name(), sharing, macs_of_xml(domains.inactive_xml(dom)))
                          for dom in conn.listAllDomains()]
    return found
