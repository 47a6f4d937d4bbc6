"""site.toml's [networks.NAME] tables, and what networks must agree on: subnets apart, one role per bridge, uplinks.

A network is a subnet on a bridge of every physical host (optionally a VLAN, an Open vSwitch); VMs join it with
cluster.conf's net= option.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from generators.errors import Problem, shown
from generators.model import Network, PhysicalHost
from generators.site_values import parse_name_servers, read_interface_name
from generators.toml_reader import Locate, TableReader


def read_network(name: str, r: TableReader) -> Network | None:
    """One [networks.NAME] table on its own; None once its problems are recorded."""
    subnet = r.convert("subnet", _subnet, "an IPv4 network", "a.b.c.d/nn")
    bridge = read_interface_name(r, "bridge", "a bridge interface name")
    gateway = r.convert("gateway", IPv4Address, "an IPv4 address", "a.b.c.d", default=None)
    vlan = _read_vlan(r)
    dns = r.convert("dns", _name_servers, "a list of IPv4 addresses", DNS_RULE, default=(), kind=list)
    ranges = r.convert("dhcp_ranges", _parse_ranges, "a list of DHCP ranges", '["FIRST-LAST", ...]', default=(),
                       kind=list)
    if subnet is not None:
        _check_inside_subnet(r, subnet, gateway, ranges or ())
    ovs = r.get("ovs", bool, False, "true when the bridge is an Open vSwitch (VLAN tag on the guest port)")
    if subnet is None or bridge is None or ovs is None:
        return None
    return Network(name, subnet, bridge, gateway, vlan, dns or (), ranges or (), ovs=ovs)


def _read_vlan(r: TableReader) -> int | None:
    vlan: int | None = r.get("vlan", int, default=None, what="a VLAN id (1-4094)")
    if vlan is not None and not 1 <= vlan <= 4094:
        r.problem("vlan", f"{shown(vlan)} is not a VLAN id (expected 1-4094)")
        return None
    return vlan


def _check_inside_subnet(r: TableReader, subnet: IPv4Network, gateway: IPv4Address | None,
                         ranges: tuple[tuple[IPv4Address, IPv4Address], ...]) -> None:
    """The gateway and the DHCP ranges are addresses of the subnet (the gateway a host address)."""
    if gateway is not None and gateway not in subnet:
        r.problem("gateway", f"'{gateway}' is outside subnet {subnet} (expected an address in it)")
    elif gateway in (subnet.network_address, subnet.broadcast_address):  # no host can answer there
        which = "network" if gateway == subnet.network_address else "broadcast"
        r.problem("gateway", f"'{gateway}' is the {which} address of subnet {subnet} (expected a host address"
                  " in it)")
    for first, last in ranges:
        if first not in subnet or last not in subnet:
            r.problem("dhcp_ranges", f"'{first}-{last}' is outside subnet {subnet} (expected a range in it)")


def _subnet(value: str) -> IPv4Network:
    try:
        return IPv4Network(value)
    except ValueError as err:
        if "host bits set" in str(err):
            raise ValueError(f"(host bits are set; expected {IPv4Network(value, strict=False)})") from None
        raise ValueError("(expected a.b.c.d/nn)") from None


DNS_RULE = '["a.b.c.d", ...]: the name servers the VMs of this network are given, or [] for the provision server'


def _name_servers(value: list[Any]) -> tuple[IPv4Address, ...]:
    return parse_name_servers(value, DNS_RULE, "where each VM would ask itself")


def _parse_ranges(value: list[Any]) -> tuple[tuple[IPv4Address, IPv4Address], ...]:
    ranges = []
    for item in value:
        parts = item.split("-") if isinstance(item, str) else []
        try:
            first, last = (IPv4Address(part.strip()) for part in parts)
        except ValueError:
            raise ValueError("(expected strings \"FIRST-LAST\" such as \"192.168.1.200-192.168.1.250\")") from None
        if last < first:
            raise ValueError(f"({item!r} ends before it starts; expected FIRST-LAST with FIRST <= LAST)")
        ranges.append((first, last))
    return tuple(ranges)


def check_subnets_apart(networks: dict[str, Network | None], locate: Locate, problems: list[Problem]) -> None:
    """Refuse a subnet that shares addresses with an earlier network's: their DHCP ranges and reverse zones clash."""
    earlier: list[Network] = []
    for name, network in networks.items():
        if network is None:
            continue
        other = next((seen for seen in earlier if seen.subnet.overlaps(network.subnet)), None)
        if other is not None:
            TableReader({}, f"networks.{name}", locate, problems).problem(
                "subnet", f"'{network.subnet}' overlaps network {other.name!r} ({other.subnet}) (expected a subnet"
                " that shares no address with another network's)")
        earlier.append(network)


def check_bridges_agree(networks: dict[str, Network | None], locate: Locate, problems: list[Problem]) -> None:
    """Refuse networks that would need one bridge (or one tagged host interface) to be two different things.

    Several subnets may share a bridge (one L2 segment), but a bridge is either an Open vSwitch or a Linux
    bridge, and a Linux bridge sits on one port of the host's uplink: the untagged NIC or one VLAN
    subinterface, which in turn joins that one bridge only. (An Open vSwitch tags each guest port, so its
    networks may differ in vlan.)
    """
    by_bridge: dict[str, Network] = {}
    by_vlan: dict[int, Network] = {}  # Linux-bridged VLANs only
    for name, network in networks.items():
        if network is None:
            continue
        r = TableReader({}, f"networks.{name}", locate, problems)
        other = by_bridge.setdefault(network.bridge, network)
        if other.ovs != network.ovs:
            r.problem("bridge", f"{shown(network.bridge)} is also the bridge of network {other.name!r}, where ovs ="
                      f" {str(other.ovs).lower()} (expected ovs = {str(other.ovs).lower()} here too, or a bridge of"
                      " its own: a bridge is either an Open vSwitch or a Linux bridge)")
        elif not network.ovs and other.vlan != network.vlan:
            r.problem("bridge", f"{shown(network.bridge)} is also the bridge of network {other.name!r}, which has"
                      f" {_tagging(other)}, and this one has {_tagging(network)} (expected {_tagging(other)} here too,"
                      " or a bridge of its own: a Linux bridge carries one VLAN; ovs = true tags each guest port)")
        elif not network.ovs and network.vlan:
            tagged = by_vlan.setdefault(network.vlan, network)
            if tagged.bridge != network.bridge:
                r.problem("vlan", f"{network.vlan} is also the vlan of network {tagged.name!r}, on bridge"
                          f" {tagged.bridge!r} (expected bridge = {tagged.bridge!r} here too, or another vlan: a"
                          " host's tagged interface <uplink>.<vlan> joins one bridge only)")


def _tagging(network: Network) -> str:
    return f"vlan {network.vlan}" if network.vlan else "no vlan"


def check_uplinks(networks: dict[str, Network | None], hosts: dict[str, PhysicalHost | None], locate: Locate,
                   problems: list[Problem]) -> None:
    """Refuse an uplink that fab kvm-setup would make the port of two untagged Linux bridges: a NIC joins one."""
    untagged: dict[str, str] = {}  # bridge -> its first network
    for name, network in networks.items():
        if network is not None and not network.ovs and not network.vlan:
            untagged.setdefault(network.bridge, name)
    if len(untagged) < 2:
        return
    (first, first_net), (second, second_net) = list(untagged.items())[:2]
    for name, host in hosts.items():
        if host is not None and host.uplink:
            TableReader({}, f"hosts.{name}", locate, problems).problem(
                "uplink", f"{shown(host.uplink)} would be the port of both untagged bridges {first!r} (network"
                f" {first_net!r}) and {second!r} (network {second_net!r}) (expected a vlan for all but one untagged"
                " network, one bridge for them, or no uplink: a NIC joins one bridge only)")
