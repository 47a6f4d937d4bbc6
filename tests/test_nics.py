"""Extra NICs (bridge, OVS VLAN port, MACVTAP, PCI passthrough, SR-IOV VF pool and pinned VF) and CPU/NUMA
pinning in the domain XML: golden files per kind, the XML elements each kind must produce, and real
consumers (virt-xml-validate, libvirt's test:///default driver)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

import pytest

from generators import domain_xml
from generators.columns import parse_nic
from generators.model import Cluster, Nic, NicKind
from generators.validate import derived_mac, load_cluster
from tests.golden import assert_golden
from tests.tools import require_module, require_tool, run

FIXTURES = Path("tests/fixtures")  # relative (conftest chdirs to the repo): the golden banner names it


@pytest.fixture(scope="module")
def nics() -> Cluster:
    return load_cluster(FIXTURES / "nics-cluster.conf", FIXTURES / "nics-site.toml")


def _domain(cluster: Cluster, name: str) -> ET.Element:
    text = domain_xml.render(cluster)[PurePosixPath("libvirt", f"{name}.xml")]
    assert isinstance(text, str)
    return ET.fromstring(text)


def _extra(cluster: Cluster, name: str) -> list[ET.Element]:
    """The devices after the primary NIC that NICs make: interfaces and hostdevs."""
    devices = _domain(cluster, name).find("devices")
    assert devices is not None
    return [d for d in devices if d.tag in ("interface", "hostdev")][1:]


def test_golden(nics: Cluster, regenerate: bool) -> None:
    assert_golden("domain_xml_nics", domain_xml.render(nics), regenerate)


@pytest.mark.parametrize(("text", "nic"), [
    ("bridge:dmz", Nic(NicKind.BRIDGE, "dmz")),
    ("bridge:dmz/52:54:00:AA:00:01", Nic(NicKind.BRIDGE, "dmz", mac="52:54:00:aa:00:01")),
    ("macvtap:eno1", Nic(NicKind.MACVTAP, "eno1", "bridge")),
    ("macvtap:eno1:passthrough", Nic(NicKind.MACVTAP, "eno1", "passthrough")),
    ("macvtap:3C:EC:EF:00:00:01", Nic(NicKind.MACVTAP, "3c:ec:ef:00:00:01", "bridge")),
    ("macvtap:3c:ec:ef:00:00:01:private/52:54:00:aa:00:02",
     Nic(NicKind.MACVTAP, "3c:ec:ef:00:00:01", "private", mac="52:54:00:aa:00:02")),
    ("pci:0000:1A:00.1", Nic(NicKind.PCI, "0000:1a:00.1")),
    ("vf:eno2", Nic(NicKind.VF, "eno2")),
    ("vf:eno2:3", Nic(NicKind.VF, "eno2", vf=3)),
])
def test_nic_grammar(text: str, nic: Nic) -> None:
    assert parse_nic(text) == nic


def test_missing_macs_derive_from_the_vms_mac_by_position(nics: Cluster) -> None:
    vm = nics.vm("macvtap")
    assert [nic.mac for nic in vm.nics] == ["56:54:00:50:00:12", "5a:54:00:50:00:12", "5e:54:00:50:00:12",
                                            "62:54:00:50:00:12"]
    assert derived_mac("52:54:00:50:00:12", 1) == "56:54:00:50:00:12"
    assert derived_mac("fe:00:00:00:00:01", 1) == "02:00:00:00:00:01"  # wraps, still unicast + local
    # a given MAC is kept, the other NICs keep their positional one
    assert [nic.mac for nic in nics.vm("vfpool").nics] == ["56:54:00:50:00:14", "52:54:00:aa:00:14"]


def test_bridge_nics_linux_bridge_needs_no_tag_ovs_gets_port_and_tag(nics: Cluster) -> None:
    dmz, ovs = _extra(nics, "bridged")
    assert (dmz.get("type"), dmz.find("source").get("bridge")) == ("bridge", "br60")  # type: ignore[union-attr]
    assert dmz.find("vlan") is None and dmz.find("virtualport") is None
    assert ovs.find("source").get("bridge") == "ovsbr0"  # type: ignore[union-attr]
    assert ovs.find("virtualport").get("type") == "openvswitch"  # type: ignore[union-attr]
    assert ovs.find("vlan/tag").get("id") == "70"  # type: ignore[union-attr]
    assert ovs.find("mac").get("address") == "52:54:00:70:00:10"  # type: ignore[union-attr]
    primary = _domain(nics, "tagged").find("devices/interface")
    assert primary is not None and primary.find("vlan/tag").get("id") == "70"  # type: ignore[union-attr]


def test_macvtap_by_name_or_mac_with_each_mode(nics: Cluster) -> None:
    sources = [(d.get("type"), d.find("source").attrib) for d in _extra(nics, "macvtap")]  # type: ignore[union-attr]
    assert sources == [("direct", {"dev": "eno3", "mode": "bridge"}), ("direct", {"dev": "eno1", "mode": "vepa"}),
                       ("direct", {"dev": "eno1", "mode": "private"}),
                       ("direct", {"dev": "eno4", "mode": "passthrough"})]


def test_pci_passthrough_is_a_managed_hostdev_without_mac(nics: Cluster) -> None:
    first, second = _extra(nics, "passthru")
    assert first.tag == "hostdev" and first.attrib == {"mode": "subsystem", "type": "pci", "managed": "yes"}
    assert first.find("source/address").attrib == {"domain": "0x0000", "bus": "0x1a", "slot": "0x00",  # type: ignore[union-attr]
                                                   "function": "0x1"}
    assert second.find("source/address").get("function") == "0x2"  # type: ignore[union-attr]
    assert first.find("mac") is None


def test_vf_from_the_pool_network_or_pinned_by_address(nics: Cluster) -> None:
    pool, _ = _extra(nics, "vfpool")
    assert pool.get("type") == "network" and pool.find("source").get("network") == "vf-eno3"  # type: ignore[union-attr]
    (pinned,) = _extra(nics, "vfpinned")
    assert pinned.attrib == {"type": "hostdev", "managed": "yes"}
    assert pinned.find("source/address").attrib == {"type": "pci", "domain": "0x0000", "bus": "0x3b",  # type: ignore[union-attr]
                                                    "slot": "0x02", "function": "0x3"}
    assert pinned.find("mac").get("address") == "56:54:00:50:00:15"  # type: ignore[union-attr]


def test_pinning_puts_emulator_on_housekeeping_cpus_and_memory_on_the_numa_node(nics: Cluster) -> None:
    domain = _domain(nics, "pinned")
    assert [(p.get("vcpu"), p.get("cpuset")) for p in domain.iterfind("cputune/vcpupin")] == [("0", "2"), ("1", "3")]
    assert domain.find("cputune/emulatorpin").get("cpuset") == "0-1"  # type: ignore[union-attr]
    assert domain.find("numatune/memory").attrib == {"mode": "strict", "nodeset": "1"}  # type: ignore[union-attr]
    unpinned = _domain(nics, "bridged")
    assert unpinned.find("cputune") is None and unpinned.find("numatune") is None


@pytest.mark.consumer
def test_virt_xml_validate_accepts_every_kind(nics: Cluster, tmp_path: Path) -> None:
    tool = require_tool("virt-xml-validate")
    require_tool("xmllint")
    for path, content in domain_xml.render(nics).items():
        assert isinstance(content, str)
        file = tmp_path / path.name
        file.write_text(content)
        result = run([tool, str(file), "domain"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{file} validates\n" in result.stderr


def _nic_summary(domain: ET.Element) -> list[tuple[str, str | None, str | None, str]]:
    """Each NIC device: tag, type, MAC and its source's attributes."""
    summary = []
    for device in domain.iterfind("devices/*"):
        if device.tag in ("interface", "hostdev"):
            mac = device.find("mac")
            source = device.find("source")
            address = source.find("address") if source is not None else None
            attrs = {**(source.attrib if source is not None else {}), **(address.attrib if address is not None else {})}
            summary.append((device.tag, device.get("type"), mac.get("address") if mac is not None else None,
                            str(sorted(attrs.items()))))
    return summary


@pytest.mark.consumer
def test_libvirt_test_driver_defines_every_kind_and_keeps_each_nic(nics: Cluster) -> None:
    libvirt = require_module("libvirt")
    connection = libvirt.open("test:///default")
    try:
        for path, content in domain_xml.render(nics).items():
            assert isinstance(content, str)
            domain = connection.defineXML(content)
            try:
                live = ET.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                wanted = ET.fromstring(content)
                assert _nic_summary(live) == _nic_summary(wanted), path  # every NIC kept, in order
                pins = [p.attrib for p in live.iterfind("cputune/*")]
                assert pins == [p.attrib for p in wanted.iterfind("cputune/*")]
                assert [m.attrib for m in live.iterfind("numatune/memory")] == \
                       [m.attrib for m in wanted.iterfind("numatune/memory")]
            finally:
                domain.undefine()
    finally:
        connection.close()
