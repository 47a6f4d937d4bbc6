"""DNS zone files: golden files, and dnspython's zone parser resolving every name and address."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path, PurePosixPath

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.zone
import pytest

from generators import dns_zones
from generators.model import Cluster
from tests.golden import assert_golden

FORWARD = PurePosixPath("dns/phys.example.org.zone")


def zones(cluster: Cluster) -> dict[PurePosixPath, str]:
    return {path: str(text) for path, text in dns_zones.render(cluster).items()}


def parse(text: str, origin: str, relativize: bool = True) -> dns.zone.Zone:
    # check_origin: the apex must have SOA and NS, as a name server would insist.
    return dns.zone.from_text(text, origin=origin, relativize=relativize, check_origin=True)


def with_subnets(cluster: Cluster, subnets: dict[str, str]) -> Cluster:
    networks = {name: replace(net, subnet=IPv4Network(subnets.get(name, str(net.subnet))))
                for name, net in cluster.site.networks.items()}
    return replace(cluster, site=replace(cluster.site, networks=networks))


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("dns_zones", dns_zones.render(example), regenerate)


def test_zone_files_are_the_forward_and_one_reverse_per_network(example: Cluster) -> None:
    assert sorted(map(str, zones(example))) == [
        "dns/50.168.192.in-addr.arpa.zone", "dns/60.168.192.in-addr.arpa.zone", "dns/phys.example.org.zone"]


@pytest.mark.parametrize("relativize", [True, False])
def test_forward_zone_resolves_every_vm_and_the_name_server(example: Cluster, relativize: bool) -> None:
    zone = parse(zones(example)[FORWARD], "phys.example.org.", relativize)
    origin = dns.name.from_text("phys.example.org.")

    def lookup(name: str) -> list[str]:
        owner = dns.name.from_text(name, origin)
        if relativize:
            owner = owner.relativize(origin)
        return [rdata.address for rdata in zone.find_rdataset(owner, dns.rdatatype.A)]

    for vm in example.vms:
        assert lookup(vm.name) == [str(vm.ip)]
        assert lookup(example.fqdn(vm) + ".") == [str(vm.ip)]
    hosts = {"kvm0": "192.168.50.4", "kvm1": "192.168.50.5"}  # the physical hosts' addresses in site.toml
    for name, address in hosts.items():
        assert lookup(name) == lookup(f"{name}.phys.example.org.") == [address]
    ns = zone.find_rdataset("@" if relativize else origin, dns.rdatatype.NS)
    assert [rdata.target.derelativize(origin).to_text() for rdata in ns] == ["ns.phys.example.org."]
    assert lookup("ns") == ["192.168.50.2"]  # the provision server
    names = {name.derelativize(origin).to_text() for name in zone.nodes}
    assert names == ({"phys.example.org.", "ns.phys.example.org."} | {example.fqdn(vm) + "." for vm in example.vms}
                     | {f"{name}.phys.example.org." for name in hosts})


def test_reverse_zones_point_every_address_at_its_fqdn(example: Cluster, tmp_path: Path) -> None:
    expected: dict[str, str] = {}
    for path, text in zones(example).items():
        if path == FORWARD:
            continue
        origin = path.name.removesuffix(".zone") + "."
        file = tmp_path / path.name
        file.write_text(text)
        zone = dns.zone.from_file(str(file), origin=origin, relativize=False, check_origin=True)
        for name, node in zone.nodes.items():
            for rdata in node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.PTR) or ():
                expected[str(dns.reversename.to_address(name))] = rdata.target.to_text()
    assert expected == {str(vm.ip): example.fqdn(vm) + "." for vm in example.vms} | {
        "192.168.50.4": "kvm0.phys.example.org.", "192.168.50.5": "kvm1.phys.example.org."}


def test_serial_is_stable_and_changes_with_the_content(example: Cluster) -> None:
    def serials(cluster: Cluster) -> dict[PurePosixPath, int]:
        return {path: parse(text, path.name.removesuffix(".zone") + ".").get_soa().serial
                for path, text in zones(cluster).items()}

    first = serials(example)
    assert serials(example) == first
    assert all(0 < serial < 2**32 for serial in first.values())
    moved = replace(example, vms=tuple(replace(vm, ip=IPv4Address("192.168.60.11")) if vm.name == "login" else vm
                                       for vm in example.vms))
    after = serials(moved)
    dmz, lan = PurePosixPath("dns/60.168.192.in-addr.arpa.zone"), PurePosixPath("dns/50.168.192.in-addr.arpa.zone")
    assert after[FORWARD] != first[FORWARD]
    assert after[dmz] != first[dmz]
    assert after[lan] == first[lan]


def test_no_timestamps_and_sorted(example: Cluster) -> None:
    text = zones(example)[FORWARD]
    owners = [line.split("\t")[0] for line in text.splitlines() if "\tIN\tA\t" in line]
    assert owners == sorted(owners)
    reverse = zones(example)[PurePosixPath("dns/50.168.192.in-addr.arpa.zone")]
    last_octets = [int(line.split("\t")[0]) for line in reverse.splitlines() if "\tIN\tPTR\t" in line]
    assert last_octets == sorted(last_octets)


def test_prefixes_off_the_octet_boundary_get_one_zone_per_octet_boundary_inside(example: Cluster) -> None:
    # A /23 as one 168.192 zone would claim all of 192.168/16: a /23 is two /24 zones, a /22 four, none beyond it.
    wide = zones(with_subnets(example, {"lan": "192.168.50.0/23", "dmz": "192.168.60.0/22"}))
    octets = (50, 51, 60, 61, 62, 63)
    assert sorted(map(str, wide)) == [f"dns/{octet}.168.192.in-addr.arpa.zone" for octet in octets] + [
        "dns/phys.example.org.zone"]
    dmz = parse(wide[PurePosixPath("dns/60.168.192.in-addr.arpa.zone")], "60.168.192.in-addr.arpa.")
    assert dmz.find_rdataset("10", dns.rdatatype.PTR)[0].target.to_text() == "login.phys.example.org."
    lan = parse(wide[PurePosixPath("dns/50.168.192.in-addr.arpa.zone")], "50.168.192.in-addr.arpa.")
    assert lan.find_rdataset("2", dns.rdatatype.PTR)[0].target.to_text() == "provision.phys.example.org."
    empty = parse(wide[PurePosixPath("dns/63.168.192.in-addr.arpa.zone")], "63.168.192.in-addr.arpa.")
    assert sorted(str(name) for name in empty.nodes) == ["@"]  # SOA and NS only: authoritative for no PTR yet
    # Between /8 and /16 likewise: a /15 is two /16 zones.
    assert [str(net) for net in dns_zones.reverse_zone_networks(IPv4Network("10.0.0.0/15"))] == [
        "10.0.0.0/16", "10.1.0.0/16"]
    assert len(dns_zones.reverse_zone_networks(IPv4Network("10.0.0.0/17"))) == 128
    # Longer than /24 (no RFC 2317): the enclosing /24
    assert dns_zones.reverse_zone_networks(IPv4Network("10.1.2.128/25")) == [IPv4Network("10.1.2.0/24")]
    assert dns_zones.reverse_origin(IPv4Network("10.1.2.128/25")) == "2.1.10.in-addr.arpa"
    assert dns_zones.reverse_owner(IPv4Address("10.1.2.130"), "2.1.10.in-addr.arpa") == "130"
    assert dns_zones.reverse_owner(IPv4Address("10.1.2.130"), "1.10.in-addr.arpa") == "130.2"


def test_provision_server_outside_the_vms_gets_the_ns_ptr(example: Cluster) -> None:
    site = example.site
    provision = replace(site.provision, server=IPv4Address("192.168.50.6"), vm=None)  # no VM's, no host's
    elsewhere = replace(example, site=replace(site, provision=provision))
    reverse = parse(zones(elsewhere)[PurePosixPath("dns/50.168.192.in-addr.arpa.zone")], "50.168.192.in-addr.arpa.")
    assert reverse.find_rdataset("6", dns.rdatatype.PTR)[0].target.to_text() == "ns.phys.example.org."
    forward = parse(zones(elsewhere)[FORWARD], "phys.example.org.")
    assert [rdata.address for rdata in forward.find_rdataset("ns", dns.rdatatype.A)] == ["192.168.50.6"]


def _renamed(cluster: Cluster, old: str, new: str) -> Cluster:
    return replace(cluster, vms=tuple(replace(vm, name=new) if vm.name == old else vm for vm in cluster.vms))


def _with_host(cluster: Cluster, name: str, address: str) -> Cluster:
    hosts = dict(cluster.site.hosts)
    hosts[name] = replace(hosts["kvm1"], name=name, address=address)
    return replace(cluster, site=replace(cluster.site, hosts=hosts))


def _server_at(cluster: Cluster, address: str) -> Cluster:
    provision = replace(cluster.site.provision, server=IPv4Address(address), vm=None)
    return replace(cluster, site=replace(cluster.site, provision=provision))


@pytest.mark.parametrize("variant", ["example", "server-outside-the-vms", "vm-called-ns", "host-called-ns"])
def test_every_ptr_names_a_name_whose_a_record_is_that_address(example: Cluster, variant: str) -> None:
    """Forward-confirmed reverse DNS: a PTR to a name whose A record is another address fails every check of it
    (sshd's UseDNS, TCP wrappers, mail servers). The provision server outside the VMs had the PTR ns.<domain> even
    when ns was a VM's or a host's name, and address; dnsmasq/hosts gives it no name then."""
    cluster = {"example": example, "server-outside-the-vms": _server_at(example, "192.168.50.6"),
               "vm-called-ns": _server_at(_renamed(example, "scratch", "ns"), "192.168.50.6"),
               "host-called-ns": _server_at(_with_host(example, "ns", "192.168.50.7"), "192.168.50.6")}[variant]
    rendered = zones(cluster)
    forward = parse(rendered[FORWARD], "phys.example.org.", relativize=False)
    addresses = {str(name): sorted(rdata.address for rdata in rdataset)
                 for name, rdataset in forward.iterate_rdatasets(dns.rdatatype.A)}
    ptrs: dict[str, list[str]] = {}
    for path, text in rendered.items():
        if path != FORWARD:
            reverse = parse(text, path.name.removesuffix(".zone") + ".", relativize=False)
            for name, rdataset in reverse.iterate_rdatasets(dns.rdatatype.PTR):
                ptrs[dns.reversename.to_address(name)] = [rdata.target.to_text() for rdata in rdataset]
    assert ptrs, variant
    for address, targets in ptrs.items():
        assert [addresses.get(target) for target in targets] == [[address]], (address, targets)
    if variant != "example":  # the server at .6 has its PTR only while ns.<domain> is its name
        assert ("192.168.50.6" in ptrs) == (variant == "server-outside-the-vms")
