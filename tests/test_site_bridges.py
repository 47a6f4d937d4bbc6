"""site.toml: networks that share a bridge must agree on what the bridge is (its VLAN, Linux or Open vSwitch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from generators.site import load_site
from tests.test_site import MINIMAL_SITE, _problems, _write


def _networks(*tables: str) -> str:
    """The minimal site with more [networks.*] tables appended, each given as 'name: key = value; ...'."""
    text = MINIMAL_SITE
    for table in tables:
        name, keys = table.split(": ")
        text += f"[networks.{name}]\n" + "".join(f"{key}\n" for key in keys.split("; "))
    return text


def _line(text: str, table: str, key: str) -> int:
    """The line of ``key`` in ``[networks.<table>]``: where the problem is reported."""
    lines = text.splitlines()
    header = lines.index(f"[networks.{table}]")
    return next(number for number, line in enumerate(lines[header:], header + 1) if line.startswith(f"{key} ="))


DMZ = 'dmz: subnet = "10.0.60.0/24"; bridge = "br60"; vlan = 60'
OVS = 'ovs: subnet = "10.0.70.0/24"; bridge = "ovsbr0"; vlan = 70; ovs = true'


@pytest.mark.parametrize(("tables", "expected"), [
    ((DMZ, 'dmz2: subnet = "10.0.61.0/24"; bridge = "br60"; vlan = 61'),
     "key 'networks.dmz2.bridge': 'br60' is also the bridge of network 'dmz', which has vlan 60, and this one has"
     " vlan 61 (expected vlan 60 here too, or a bridge of its own: a Linux bridge carries one VLAN; ovs = true tags"
     " each guest port)"),
    ((DMZ, 'dmz2: subnet = "10.0.61.0/24"; bridge = "br60"'),
     "key 'networks.dmz2.bridge': 'br60' is also the bridge of network 'dmz', which has vlan 60, and this one has"
     " no vlan (expected vlan 60 here too, or a bridge of its own: a Linux bridge carries one VLAN; ovs = true tags"
     " each guest port)"),
    ((OVS, 'plain: subnet = "10.0.61.0/24"; bridge = "ovsbr0"; vlan = 70'),
     "key 'networks.plain.bridge': 'ovsbr0' is also the bridge of network 'ovs', where ovs = true (expected ovs ="
     " true here too, or a bridge of its own: a bridge is either an Open vSwitch or a Linux bridge)"),
])
def test_networks_that_disagree_about_their_bridge_are_refused(tables: tuple[str, ...], expected: str,
                                                                tmp_path: Path) -> None:
    text = _networks(*tables)
    later = tables[1].split(":")[0]
    assert _problems(_write(tmp_path, text)) == [f"{_line(text, later, 'bridge')}:1: {expected}"]


def test_a_tagged_network_on_an_untagged_bridge_is_refused(tmp_path: Path) -> None:
    # The minimal site's own untagged lan (br0) is the earlier network: the message names it.
    text = _networks('dmz: subnet = "10.0.60.0/24"; bridge = "br0"; vlan = 60')
    assert _problems(_write(tmp_path, text)) == [
        f"{_line(text, 'dmz', 'bridge')}:1: key 'networks.dmz.bridge': 'br0' is also the bridge of network 'lan',"
        " which has no vlan, and this one has vlan 60 (expected no vlan here too, or a bridge of its own: a Linux"
        " bridge carries one VLAN; ovs = true tags each guest port)"]


def test_one_vlan_on_two_linux_bridges_is_refused(tmp_path: Path) -> None:
    # The host's eno1.60 can be a port of one bridge only.
    text = _networks(DMZ, 'dmz2: subnet = "10.0.61.0/24"; bridge = "br61"; vlan = 60')
    assert _problems(_write(tmp_path, text)) == [
        f"{_line(text, 'dmz2', 'vlan')}:1: key 'networks.dmz2.vlan': 60 is also the vlan of network 'dmz', on bridge"
        " 'br60' (expected bridge = 'br60' here too, or another vlan: a host's tagged interface <uplink>.<vlan> joins"
        " one bridge only)"]


def test_subnets_may_share_a_bridge_that_they_agree_on(tmp_path: Path) -> None:
    # Two subnets on one L2 segment (a Linux bridge on one VLAN), and two VLANs on one Open vSwitch (tags on the
    # guests' ports; the same VLAN on another Open vSwitch bridge too).
    text = _networks(DMZ, 'dmz2: subnet = "10.0.61.0/24"; bridge = "br60"; vlan = 60', OVS,
                     'ovs2: subnet = "10.0.71.0/24"; bridge = "ovsbr0"; vlan = 71; ovs = true',
                     'ovs3: subnet = "10.0.72.0/24"; bridge = "ovsbr1"; vlan = 70; ovs = true',
                     'lan2: subnet = "10.0.1.0/24"; bridge = "br0"')
    site = load_site(_write(tmp_path, text))
    assert {name: (net.bridge, net.vlan, net.ovs) for name, net in site.networks.items()} == {
        "lan": ("br0", None, False), "dmz": ("br60", 60, False), "dmz2": ("br60", 60, False),
        "ovs": ("ovsbr0", 70, True), "ovs2": ("ovsbr0", 71, True), "ovs3": ("ovsbr1", 70, True),
        "lan2": ("br0", None, False)}


def test_an_uplink_under_two_untagged_bridges_is_refused(tmp_path: Path) -> None:
    # fab kvm-setup would make eno1 the port of br0 and of br1; without an uplink they are two host-only bridges.
    text = _networks('lan2: subnet = "10.0.1.0/24"; bridge = "br1"', DMZ)
    assert load_site(_write(tmp_path, text)).networks["lan2"].bridge == "br1"
    uplink = 'uplink = "eno1"'
    text = text.replace("disk_gb = 100\n", f"disk_gb = 100\n{uplink}\n")
    assert _problems(_write(tmp_path, text)) == [
        f"{text.splitlines().index(uplink) + 1}:1: key 'hosts.h1.uplink': 'eno1' would be the port of"
        " both untagged bridges 'br0' (network 'lan') and 'br1' (network 'lan2') (expected a vlan for all but one"
        " untagged network, one bridge for them, or no uplink: a NIC joins one bridge only)"]
