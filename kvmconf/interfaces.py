"""This machine's network interfaces and their IP addresses, as iproute2 reports them (`ip -j address`).

Its own module, with nothing behind it but `ip`, so that the backup's "which host of site.toml is this
machine" needs neither the provision server nor the generators it imports.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, ip_address

from kvmconf.processes import output_of

_FAMILIES = ("inet", "inet6")


def interface_addresses(netns: str | None = None) -> dict[str, set[IPv4Address | IPv6Address]]:
    """Each network interface of this machine (or of the namespace ``netns``) with its IPv4 and IPv6 addresses."""
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "address", "show"]
    return {link["ifname"]: {ip_address(a["local"]) for a in link.get("addr_info", []) if a.get("family") in _FAMILIES}
            for link in json.loads(output_of(argv, timeout=60) or "[]")}
