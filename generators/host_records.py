"""The physical hosts of site.toml in the cluster's DNS: which [hosts.X] get a record, and which one.

The VMs' name server is the cluster's dnsmasq, which answers the cluster domain from dnsmasq/hosts
alone (local=/<domain>/) and forwards no name without a dot (domain-needed): a physical host missing
from that file cannot be resolved from a VM, neither as ``kvm0`` nor as ``kvm0.<domain>``. So every
DNS artefact that has the VMs (dnsmasq/hosts, dns/*.zone, the hosts fragment) has these records too,
all from this one list.

A host gets a record (NAME and NAME.<domain> -> its address) when all of these hold:
- its ``address`` is an IP address. A DNS name gets none: a hosts-file line and an A/AAAA record need
  an IP, and resolving the name here would freeze whatever it resolves to at build time.
- the address means that host from every VM: not loopback or unspecified (a VM would reach itself or
  nothing), not multicast, and not an IPv6 address with a zone (``fe80::1%eno1``), which only the
  host's own interface gives a meaning.
- its name is a DNS label, like a VM's (site.toml's host names may have capitals, '_' or '.'), and
  NAME.<domain> fits DNS's 253 characters.
validate.py refuses a host whose name is a VM's, or whose address is a VM's IP, so a record never
contradicts a VM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from generators.columns import LABEL
from generators.model import Cluster
from generators.site_values import MAX_DNS_NAME


@dataclass(frozen=True)
class HostRecord:
    name: str
    fqdn: str
    ip: IPv4Address | IPv6Address

    @property
    def rdtype(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"


def _publishable(ip: IPv4Address | IPv6Address) -> bool:
    scoped = isinstance(ip, IPv6Address) and ip.scope_id is not None
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or scoped)


def host_records(cluster: Cluster) -> list[HostRecord]:
    """The records of the physical hosts that get one (see the module's docstring), sorted by name."""
    domain = cluster.site.domain
    records = []
    for name in sorted(cluster.site.hosts):
        ip = cluster.site.hosts[name].ip
        fqdn = f"{name}.{domain}"
        if ip is not None and _publishable(ip) and LABEL.fullmatch(name) and len(fqdn) <= MAX_DNS_NAME:
            records.append(HostRecord(name, fqdn, ip))
    return records
