"""Network interfaces and their IP addresses, as iproute2 reports them (`ip -j address`).

Its own module, with nothing behind it but `ip`, so that the backup's "which host of site.toml is this
machine" needs neither the provision server nor the generators it imports. `fab kvm-setup` reads a host's
interfaces with the same parser, from `ip -j address show` run there.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, ip_address

from kvmconf.processes import output_of

_FAMILIES = ("inet", "inet6")
# Addresses no other machine reaches the interface at: loopback's, and the fe80:: one every interface that is up has.
_LOCAL_SCOPES = ("host", "link")


def interface_addresses(netns: str | None = None) -> dict[str, set[IPv4Address | IPv6Address]]:
    """Each network interface of this machine (or of the namespace ``netns``) with its IPv4 and IPv6 addresses."""
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "address", "show"]
    return parse_addresses(output_of(argv, timeout=60) or "[]")


def parse_addresses(ip_json: str, *, reachable_only: bool = False) -> dict[str, set[IPv4Address | IPv6Address]]:
    """Each interface in the output of `ip -j address show` with its IPv4 and IPv6 addresses; ``reachable_only``:
    without the loopback and link-local ones (scope host, link)."""
    skipped = _LOCAL_SCOPES if reachable_only else ()
    return {link["ifname"]: {ip_address(a["local"]) for a in link.get("addr_info", [])
                             if a.get("family") in _FAMILIES and a.get("scope") not in skipped}
            for link in json.loads(ip_json or "[]")}
