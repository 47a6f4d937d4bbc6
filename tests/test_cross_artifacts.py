"""Every generated file that names a VM agrees with cluster.conf on its MAC and IP.

Each artifact is read the way its consumer reads it (XML parser, YAML, dnspython, line formats);
the maps name -> IP and name -> MAC built from each must equal the model's, VM for VM.
"""

from __future__ import annotations

import configparser
import re
import xml.etree.ElementTree as ET
from pathlib import PurePosixPath

import dns.rdatatype
import dns.zone
import pytest
import yaml

from generators.build import render_all
from generators.model import Boot, Cluster, Install


@pytest.fixture(scope="module")
def tree(example: Cluster) -> dict[str, str]:
    return {str(p): c for p, c in render_all(example).items() if isinstance(c, str)}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _hosts_file(text: str) -> dict[str, str]:
    return {fields[2]: fields[0] for fields in (line.split() for line in _lines(text))}


def test_dhcp_reservations(example: Cluster, tree: dict[str, str]) -> None:
    ips, macs = {}, {}
    for vm in example.vms:
        (line,) = _lines(tree[f"dnsmasq/dhcp-hosts/{vm.name}"])
        fields = line.split(",")
        ips[vm.name], macs[vm.name] = fields[-3], fields[0]
        assert fields[-2] == vm.name
        assert len(fields) == 4  # no tags: see templates/dnsmasq.conf.j2
    assert ips == {vm.name: str(vm.ip) for vm in example.vms}
    assert macs == {vm.name: vm.mac for vm in example.vms}


def test_dns_for_dnsmasq_and_etc_hosts(example: Cluster, tree: dict[str, str]) -> None:
    expected = {vm.name: str(vm.ip) for vm in example.vms}
    expected |= {name: str(host.address) for name, host in example.site.hosts.items()}  # IP addresses, all of them
    assert _hosts_file(tree["dnsmasq/hosts"]) == expected
    assert _hosts_file(tree["hosts"]) == expected
    for line in _lines(tree["hosts"]):
        _ip, fqdn, name = line.split()
        assert fqdn == f"{name}.{example.site.domain}"


def test_dns_zones(example: Cluster, tree: dict[str, str]) -> None:
    domain = example.site.domain
    forward = dns.zone.from_text(tree[f"dns/{domain}.zone"], origin=domain, relativize=False)
    names, ptrs = {}, {}
    for vm in example.vms:
        rrset = forward.get_rrset(f"{vm.name}.{domain}.", dns.rdatatype.A)
        assert rrset is not None, vm.name
        names[vm.name] = {r.address for r in rrset}
    for path, text in tree.items():
        if path.endswith(".in-addr.arpa.zone"):
            origin = PurePosixPath(path).name.removesuffix(".zone")
            zone = dns.zone.from_text(text, origin=origin, relativize=False)
            for name, node in zone.nodes.items():
                for rdataset in node.rdatasets:
                    if rdataset.rdtype == dns.rdatatype.PTR:
                        for r in rdataset:
                            ptrs[str(r.target).rstrip(".")] = name.to_text().removesuffix(".in-addr.arpa.")
    assert names == {vm.name: {str(vm.ip)} for vm in example.vms}
    for vm in example.vms:
        assert ptrs[f"{vm.name}.{domain}"] == ".".join(reversed(str(vm.ip).split(".")))


def test_libvirt_domains(example: Cluster, tree: dict[str, str]) -> None:
    macs = {}
    for vm in example.vms:
        domain = ET.fromstring(tree[f"libvirt/{vm.name}.xml"])
        assert domain.findtext("name") == vm.name
        macs[vm.name] = [m.get("address") for m in domain.iter("mac")]
    assert macs == {vm.name: [vm.mac] for vm in example.vms}


def test_ssh_config_nagios_and_ansible(example: Cluster, tree: dict[str, str]) -> None:
    expected = {vm.name: str(vm.ip) for vm in example.vms}
    ssh = dict(re.findall(r"^Host (\S+) \S+\n\s+HostName (\S+)", tree["ssh/config"], re.M))
    assert ssh == expected
    nagios = dict(re.findall(r"host_name\s+(\S+)\n(?:.*\n)*?\s+address\s+(\S+)", tree["nagios/hosts.cfg"]))
    assert nagios == expected
    inventory = configparser.ConfigParser(allow_no_value=True, delimiters=(" ",))
    inventory.read_string(tree["ansible/inventory.ini"])
    ansible = {}
    for section in inventory.sections():
        for key, value in inventory.items(section):
            if value and value.startswith("ansible_host="):
                assert ansible.setdefault(key, value.split("=", 1)[1]) == value.split("=", 1)[1]
    assert ansible == expected


def test_installers(example: Cluster, tree: dict[str, str]) -> None:
    for vm in example.vms:
        pxelinux = f"tftp/pxelinux.cfg/01-{vm.mac_dashes}"
        grub = f"tftp/grub/grub.cfg-{vm.mac}"
        preseed = f"preseed/{vm.name}.cfg"
        if vm.install is Install.PXE:
            assert f"d-i netcfg/get_ipaddress string {vm.ip}\n" in tree[preseed]
            entry = tree[pxelinux] if vm.boot is Boot.BIOS else tree[grub]
            assert f"hostname={vm.name} " in entry and f"/preseed/{vm.name}.cfg" in entry
            assert (pxelinux in tree) == (vm.boot is Boot.BIOS) and (grub in tree) == (vm.boot is Boot.UEFI)
        else:
            assert preseed not in tree and pxelinux not in tree and grub not in tree
        seed = f"cloud-init/{vm.name}/network-config"
        if vm.install is Install.CLOUD:
            (ethernet,) = yaml.safe_load(tree[seed])["ethernets"].values()
            prefix = example.network_of(vm).subnet.prefixlen
            assert ethernet["match"]["macaddress"] == vm.mac
            assert ethernet["addresses"] == [f"{vm.ip}/{prefix}"]
        else:
            assert seed not in tree


def test_no_file_names_an_address_that_is_not_in_cluster_conf(example: Cluster, tree: dict[str, str]) -> None:
    known_ips = {str(vm.ip) for vm in example.vms} | {str(n.gateway) for n in example.site.networks.values()}
    known_ips |= {str(a) for n in example.site.networks.values() for a in n.dns_servers}
    known_ips |= {h.address for h in example.site.hosts.values() if h.address}  # the Nagios backup check's targets
    known_macs = {vm.mac for vm in example.vms}
    for path, text in tree.items():
        for ip in re.findall(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])", text):
            if ip.startswith("192.168.") and not ip.endswith(".0") and not ip.endswith(".255"):
                assert ip in known_ips, f"{path} names {ip}, which is no VM's, gateway's, name server's or host's"
        for mac in re.findall(r"52:54:00(?::[0-9a-f]{2}){3}", text):
            assert mac in known_macs, f"{path} names MAC {mac}, which is no VM's"


def test_every_vm_is_in_every_per_cluster_artifact(example: Cluster, tree: dict[str, str]) -> None:
    for path in ("ssh/config", "nagios/hosts.cfg", "ansible/inventory.ini", "hosts", "dnsmasq/hosts"):
        for vm in example.vms:
            assert re.search(rf"\b{vm.name}\b", tree[path]), f"{vm.name} missing from {path}"


def test_generated_files_all_carry_the_banner(tree: dict[str, str]) -> None:
    for path, text in tree.items():
        head = "\n".join(text.splitlines()[:4])
        assert "Generated by kvmconf from cluster.conf and site.toml" in head, path
        assert "run `make` again" in head, path

