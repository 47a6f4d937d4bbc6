"""dns/<domain>.zone and dns/<reversed octets>.in-addr.arpa.zone: BIND-format zones for the cluster.

For name servers other than the provision server's dnsmasq (which answers from dnsmasq/hosts): a
forward zone with an A record per VM, and reverse zones with a PTR per VM. in-addr.arpa delegates on
octet boundaries only, so a network on one (/8, /16, /24) is one zone, and a network between two is
one zone per network of the next longer boundary: a /23 is two /24 zones, a /20 sixteen, a /15 two /16
zones. (One enclosing zone, 168.192 for a /23, would claim authority over addresses the cluster does
not have, hiding their real PTRs from every client of this server.) A network longer than /24 (/25 ..
/32) is in its enclosing /24 zone, shared with any other network inside it: RFC 2317 delegation of
part of a /24 is left to the admin.

The physical hosts that have a DNS record (generators/host_records.py) are in the forward zone too (A
or AAAA), with a PTR in the reverse zone whose addresses hold theirs, if any: an address outside every
network's zone, or an IPv6 one, has no zone here to put a PTR in (dnsmasq still answers its PTR).

The NS record names ns.<domain>, an A record for the provision server (unless a VM or a host with a
record is itself called `ns`, whose record then serves). The provision server's PTR is ns.<domain>
unless a VM or such a host has its address, or ns.<domain> is that VM's or host's name (then the
server has no name here, and no PTR, as in dnsmasq/hosts).

The SOA serial is the first 32 bits of the SHA-256 of the zone rendered with serial 0: it changes
whenever the content does and stays the same otherwise, with no clock and no state. It does not
grow, though: a secondary that compares serials (RFC 1982) will take about half of the changes for
older zones; reload secondaries explicitly (`rndc retransfer`) rather than trusting NOTIFY. A growing
serial needs the previous one, i.e. state outside the inputs, which the generators' contract (pure,
deterministic, the same build from the same inputs) excludes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import PurePosixPath
from typing import Any

from generators.host_records import HostRecord, host_records
from generators.model import Cluster
from generators.render import render as render_template

TEMPLATE = "zone.j2"
NS_NAME = "ns"
TIMERS = {"ttl": 3600, "refresh": 3600, "retry": 900, "expire": 1209600, "negative_ttl": 300}

Record = tuple[str, str, str]  # owner relative to the origin, type, value


def reverse_origin(subnet: IPv4Network) -> str:
    """The in-addr.arpa zone of ``subnet``'s enclosing octet boundary, e.g. /24 -> /24, /25 -> /24."""
    octets = str(subnet.network_address).split(".")[: subnet.prefixlen // 8]
    return ".".join([*reversed(octets), "in-addr.arpa"])


def reverse_zone_prefix(subnet: IPv4Network) -> int:
    """The prefix of the reverse zones of ``subnet``: the next octet boundary at or after its own, at most /24."""
    return min(-(-subnet.prefixlen // 8) * 8, 24)


def reverse_zone_networks(subnet: IPv4Network) -> list[IPv4Network]:
    """The addresses of each reverse zone of ``subnet``: /23 -> its two /24s, /24 -> itself, /25 -> its /24."""
    prefix = reverse_zone_prefix(subnet)
    if prefix <= subnet.prefixlen:
        return [subnet.supernet(new_prefix=prefix)]
    return list(subnet.subnets(new_prefix=prefix))


def reverse_owner(ip: IPv4Address, origin: str) -> str:
    """The PTR owner of ``ip`` relative to ``origin`` (``10`` in a /24 zone, ``10.60`` in a /16)."""
    kept = origin.count(".") - 1  # the octets already in the origin, before "in-addr.arpa"
    return ".".join(reversed(str(ip).split(".")[kept:]))


def serial_of(text: str) -> int:
    """A 32-bit serial from a zone rendered with serial 0 (never 0 itself)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") or 1


def _zone(cluster: Cluster, kind: str, origin: str, records: Iterable[Record]) -> str:
    context: dict[str, Any] = {
        "kind": kind, "origin": origin, "ns_fqdn": f"{NS_NAME}.{cluster.site.domain}", "records": list(records),
        **TIMERS,
    }
    unstamped = render_template(TEMPLATE, cluster, serial=0, **context)
    return render_template(TEMPLATE, cluster, serial=serial_of(unstamped), **context)


def _provision_server(cluster: Cluster) -> IPv4Address:
    server = cluster.site.provision.server
    if server is None:
        raise RuntimeError("programming error: provision.server is resolved by validate.py")
    return server


def ns_address(cluster: Cluster, hosts: list[HostRecord]) -> IPv4Address | None:
    """The address of the zones' name server, ns.<domain>: the provision server's; None when a VM or a host with a
    record is itself called `ns`, whose own record serves."""
    if any(vm.name == NS_NAME for vm in cluster.vms) or any(host.name == NS_NAME for host in hosts):
        return None
    return _provision_server(cluster)


def forward_records(cluster: Cluster, hosts: list[HostRecord]) -> list[Record]:
    records = [(vm.name, "A", str(vm.ip)) for vm in cluster.vms]
    records += [(host.name, host.rdtype, str(host.ip)) for host in hosts]
    if (server := ns_address(cluster, hosts)) is not None:
        records.append((NS_NAME, "A", str(server)))
    return sorted(records)


def reverse_records(cluster: Cluster, hosts: list[HostRecord]) -> dict[str, list[tuple[IPv4Address, str]]]:
    """Zone origin -> (ip, fqdn) for every PTR, sorted by address; every network gets its zone."""
    zones: dict[str, list[tuple[IPv4Address, str]]] = {}
    held: dict[str, IPv4Network] = {}  # origin -> the addresses of its zone
    for network in cluster.site.networks.values():
        for zone in reverse_zone_networks(network.subnet):
            zones.setdefault(reverse_origin(zone), [])
            held[reverse_origin(zone)] = zone
    ptrs = [(vm.ip, cluster.fqdn(vm)) for vm in cluster.vms]
    ptrs += [(host.ip, host.fqdn) for host in hosts if isinstance(host.ip, IPv4Address)]
    # The server's PTR names ns.<domain> only where that is its name: a VM or host called ns has the name, and its
    # own PTR, and a PTR for a name that points elsewhere fails every forward-confirmed lookup (dnsmasq has none).
    server = ns_address(cluster, hosts)
    if server is not None and all(ip != server for ip, _ in ptrs):
        ptrs.append((server, f"{NS_NAME}.{cluster.site.domain}"))
    # Zones never nest (site.toml refuses overlapping subnets), so an address is in one zone at most: a VM's in its
    # network's; a host's or the server's may be in none (no PTR then) or beside a /25 in its /24 zone.
    for ip, fqdn in ptrs:
        origin = next((origin for origin, zone in held.items() if ip in zone), None)
        if origin is not None:
            zones[origin].append((ip, fqdn))
    return {origin: sorted(entries) for origin, entries in sorted(zones.items())}


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    domain = cluster.site.domain
    hosts = host_records(cluster)
    tree: dict[PurePosixPath, str | bytes] = {
        PurePosixPath("dns", f"{domain}.zone"): _zone(cluster, "Forward", domain, forward_records(cluster, hosts)),
    }
    for origin, entries in reverse_records(cluster, hosts).items():
        records = [(reverse_owner(ip, origin), "PTR", f"{fqdn}.") for ip, fqdn in entries]
        tree[PurePosixPath("dns", f"{origin}.zone")] = _zone(cluster, "Reverse", origin, records)
    return tree
