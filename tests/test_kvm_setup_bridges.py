"""Several networks on one bridge: fab kvm-setup writes each interface once (read by its consumer), and the VMs'
domain XML and dnsmasq treat each network as its own subnet on that bridge."""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import pytest
import yaml

from generators import dnsmasq, domain_xml
from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf.hostsetup import bridges, host_files, nmcli_commands
from tests.test_hostsetup import _with_host
from tests.tools import ROOT, require_tool, run
from tests.unique_yaml import UniqueKeyLoader

# Beside the example's dmz (br60, vlan 60): a second subnet on its L2 segment, and two VLANs on an Open vSwitch.
SHARED = """
[networks.dmz2]
subnet = "192.168.61.0/24"
bridge = "br60"
vlan = 60

[networks.ovs]
subnet = "192.168.70.0/24"
bridge = "ovsbr0"
vlan = 70
ovs = true

[networks.ovs2]
subnet = "192.168.71.0/24"
bridge = "ovsbr0"
vlan = 71
ovs = true
"""
ON_DMZ2 = "dmz2vm\t52:54:00:61:00:10\t192.168.61.10\t1024\t10\t1\tlinux-servers\thost=kvm0 net=dmz2\n"


@pytest.fixture
def shared(tmp_path: Path) -> Cluster:
    (tmp_path / "site.toml").write_text((ROOT / "site.toml").read_text() + SHARED)
    (tmp_path / "cluster.conf").write_text((ROOT / "cluster.conf").read_text() + ON_DMZ2)
    return load_cluster(tmp_path / "cluster.conf", tmp_path / "site.toml")


def _files(cluster: Cluster, stack: str) -> str:
    cluster = _with_host(cluster, uplink="eno1", network_stack=stack)
    _, bridge_file = host_files(cluster, cluster.site.hosts["kvm0"])
    assert bridge_file is not None
    return bridge_file.content.decode()


def test_a_shared_bridge_is_one_bridge_and_open_vswitch_ones_are_left_alone(shared: Cluster) -> None:
    cluster = _with_host(shared, uplink="eno1")
    assert [(b.networks, b.name, b.vlan, b.port) for b in bridges(cluster, cluster.site.hosts["kvm0"])] == [
        (("dmz", "dmz2"), "br60", 60, "eno1.60"), (("lan",), "br0", None, "eno1")]


def test_netplan_file_has_each_interface_once(shared: Cluster) -> None:
    # netplan, like PyYAML, would keep the last of two equal keys: this loader refuses the second instead.
    doc = yaml.load(_files(shared, "netplan"), UniqueKeyLoader)
    assert doc["network"]["vlans"] == {"eno1.60": {"id": 60, "link": "eno1"}}
    assert {name: b["interfaces"] for name, b in doc["network"]["bridges"].items()} == {
        "br60": ["eno1.60"], "br0": ["eno1"]}


@pytest.fixture
def only_ovs(example: Cluster) -> Cluster:
    """Every network on Open vSwitch: kvm-setup makes no Linux bridge at all."""
    networks = {name: dataclasses.replace(net, ovs=True) for name, net in example.site.networks.items()}
    return dataclasses.replace(example, site=dataclasses.replace(example.site, networks=networks))


def test_netplan_file_without_linux_bridges_has_no_empty_sections(only_ovs: Cluster) -> None:
    # An empty `bridges:` parses as null, which netplan refuses ("expected mapping"). And no eno1 either: no Linux
    # bridge nor VLAN of kvmconf uses it, and its `dhcp4: false` here overrode the host's own file, address and all.
    doc = yaml.load(_files(only_ovs, "netplan"), UniqueKeyLoader)
    assert doc == {"network": {"version": 2}}


def test_netplan_file_overrides_no_address_of_the_hosts_own_files(example: Cluster) -> None:
    # netplan merges its files, a later file's key overriding an earlier one's: `dhcp4: false` on the uplink and on
    # every bridge took the host's address away where its own file (50-cloud-init.yaml) gave it by DHCP, on a NIC
    # that carries VLANs alone, or on the bridge the admin had moved it to. Only a bridge port's DHCP is turned off.
    doc = yaml.load(_files(example, "netplan"), UniqueKeyLoader)["network"]
    assert doc["ethernets"] == {"eno1": {"dhcp4": False, "dhcp6": False}}  # br0's port
    assert doc["bridges"] == {
        "br60": {"interfaces": ["eno1.60"], "parameters": {"stp": False, "forward-delay": 0}},
        "br0": {"interfaces": ["eno1"], "parameters": {"stp": False, "forward-delay": 0}}}
    vlans_only = {name: net for name, net in example.site.networks.items() if net.vlan}
    tagged = dataclasses.replace(example, site=dataclasses.replace(example.site, networks=vlans_only))
    doc = yaml.load(_files(tagged, "netplan"), UniqueKeyLoader)["network"]
    assert doc["ethernets"] == {"eno1": {}}  # declared, for the VLAN's `link`; its settings are the host's files'
    assert doc["vlans"] == {"eno1.60": {"id": 60, "link": "eno1"}}


def test_ifupdown_file_and_network_manager_without_linux_bridges_configure_nothing(only_ovs: Cluster,
                                                                                   tmp_path: Path) -> None:
    ifquery = require_tool("ifquery")
    interfaces = tmp_path / "interfaces"
    interfaces.write_text(_files(only_ovs, "ifupdown"))
    listed = run([ifquery, "-i", str(interfaces), "-l"])
    assert (listed.returncode, listed.stdout.split()) == (0, ["lo"]), listed.stderr
    host = _with_host(only_ovs, uplink="eno1", network_stack="networkmanager").site.hosts["kvm0"]
    assert nmcli_commands(only_ovs, host, set(), set()) == []


def test_ifupdown_file_has_each_interface_once(shared: Cluster, tmp_path: Path) -> None:
    ifquery = require_tool("ifquery")
    text = _files(shared, "ifupdown")
    # ifupdown merges two stanzas of one interface (every option twice) and still lists it once: count them.
    stanzas = [line.split()[1] for line in text.splitlines() if line.startswith("iface ")]
    assert stanzas == ["eno1.60", "br60", "br0"]
    assert "# network dmz and dmz2\n" in text and "ovsbr0" not in text
    interfaces = tmp_path / "interfaces"
    interfaces.write_text(text)
    listed = run([ifquery, "-i", str(interfaces), "-l"])
    assert (listed.returncode, listed.stdout.split()) == (0, ["lo", "eno1.60", "br60", "br0"]), listed.stderr
    br60 = run([ifquery, "-i", str(interfaces), "br60"])
    assert (br60.returncode, br60.stdout.count("bridge_ports:")) == (0, 1), br60.stderr
    assert "bridge_ports: eno1.60\n" in br60.stdout


def test_network_manager_adds_each_connection_once(shared: Cluster) -> None:
    host = _with_host(shared, uplink="eno1", network_stack="networkmanager").site.hosts["kvm0"]
    commands = nmcli_commands(shared, host, set(), set())
    added = [words[words.index("con-name") + 1] for words in commands if words[2] == "add"]
    assert added == ["kvmconf-br60", "kvmconf-br60-port", "kvmconf-br0", "kvmconf-br0-port"]
    assert [words[3] for words in commands if words[2] == "up"] == ["kvmconf-br60", "kvmconf-br0"]


def test_a_vm_of_the_second_subnet_joins_the_shared_bridge_and_gets_its_own_dhcp_range(shared: Cluster) -> None:
    xml = ElementTree.fromstring(domain_xml.render(shared)[PurePosixPath("libvirt", "dmz2vm.xml")])
    nics = xml.findall("devices/interface")
    assert [(nic.get("type"), nic.find("source").get("bridge")) for nic in nics] == [  # type: ignore[union-attr]
        ("bridge", "br60")]
    assert nics[0].find("vlan") is None  # the Linux bridge br60 is on eno1.60: the host tags, not the guest port
    conf = str(dnsmasq.render(shared)[PurePosixPath("dnsmasq", "dnsmasq.conf")])
    assert "dhcp-range=set:dmz,192.168.60.0,static,255.255.255.0,12h\n" in conf
    assert "dhcp-range=set:dmz2,192.168.61.0,static,255.255.255.0,12h\n" in conf
