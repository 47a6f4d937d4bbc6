"""The physical hosts in the cluster's DNS: which get a record, the same one in every DNS artefact, and a real
dnsmasq answering a VM's questions about them (short name, FQDN, AAAA, PTR) from the generated files."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path, PurePosixPath

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.zone
import pytest

from generators import dns_zones, dnsmasq, etc_hosts
from generators.host_records import HostRecord, host_records
from generators.model import Cluster
from tests.test_nagios_backup_address import _free_udp_port
from tests.tools import require_tool

DOMAIN = "phys.example.org"


def with_hosts(cluster: Cluster, **addresses: str | None) -> Cluster:
    """The cluster with these hosts' addresses; a name site.toml lacks becomes a copy of kvm1 with that name."""
    hosts = dict(cluster.site.hosts)
    for name, address in addresses.items():
        hosts[name] = dataclasses.replace(hosts.get(name, hosts["kvm1"]), name=name, address=address)
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts))


def varied(cluster: Cluster) -> Cluster:
    """One host of each kind: IPv4 (kvm0, as in the example), IPv6, outside every reverse zone, and five without a
    record: a DNS name, loopback, a scoped IPv6 address, a name that is no DNS label, no address at all."""
    return with_hosts(cluster, kvm1="2001:db8::5", kvm6="10.99.0.6", kvm2="kvm2.mgmt.example.net",
                      kvm3="127.0.0.1", kvm4="fe80::4%eno1", KVM_5="192.168.50.7", kvm7=None)


EXPECTED = {"kvm0": "192.168.50.4", "kvm1": "2001:db8::5", "kvm6": "10.99.0.6"}  # what varied() publishes


def _entries(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


def test_which_hosts_get_a_record(example: Cluster) -> None:
    assert host_records(example) == [HostRecord("kvm0", "kvm0.phys.example.org", IPv4Address("192.168.50.4")),
                                     HostRecord("kvm1", "kvm1.phys.example.org", IPv4Address("192.168.50.5"))]
    records = host_records(varied(example))
    assert [(r.name, r.fqdn, str(r.ip), r.rdtype) for r in records] == [
        ("kvm0", "kvm0.phys.example.org", "192.168.50.4", "A"),
        ("kvm1", "kvm1.phys.example.org", "2001:db8::5", "AAAA"),
        ("kvm6", "kvm6.phys.example.org", "10.99.0.6", "A")]
    assert isinstance(records[1].ip, IPv6Address)


def test_a_name_too_long_for_dns_gets_no_record(example: Cluster) -> None:
    long_domain = "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + "." + "g" * 50  # 242 characters, the most allowed
    cluster = dataclasses.replace(example, site=dataclasses.replace(example.site, domain=long_domain))
    cluster = with_hosts(cluster, **{"h" * 10: "192.168.50.8", "i" * 11: "192.168.50.9"})  # 253 fits, 254 does not
    assert [r.name for r in host_records(cluster)] == ["h" * 10, "kvm0", "kvm1"]


def test_every_dns_artefact_has_the_same_host_records(example: Cluster) -> None:
    cluster = varied(example)
    vm_names = {vm.name for vm in cluster.vms}
    expected = {name: [f"{name}.{DOMAIN}", address] for name, address in EXPECTED.items()}

    def hosts_of(text: str | bytes) -> dict[str, list[str]]:
        assert isinstance(text, str)
        names: dict[str, list[str]] = {}
        for ip, *more in _entries(text):  # fqdn, short name, and as many more pairs as the address has names
            names |= {short: [fqdn, ip] for fqdn, short in zip(more[::2], more[1::2], strict=True)}
        return {name: entry for name, entry in names.items() if name not in vm_names}

    ns = {"ns": ["ns.phys.example.org", "192.168.50.2"]}  # the zones' name server: the provision VM
    assert hosts_of(dnsmasq.render(cluster)[PurePosixPath("dnsmasq/hosts")]) == expected | ns
    assert hosts_of(etc_hosts.render(cluster)[PurePosixPath("hosts")]) == expected

    zones = dns_zones.render(cluster)
    forward = dns.zone.from_text(str(zones[PurePosixPath(f"dns/{DOMAIN}.zone")]), origin=f"{DOMAIN}.",
                                 relativize=False, check_origin=True)
    found = {}
    for name, node in forward.nodes.items():
        for rdataset in node.rdatasets:
            if rdataset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                short = name.to_text().removesuffix(f".{DOMAIN}.")
                if short not in vm_names:
                    found[short] = [name.to_text().rstrip("."), *(r.address for r in rdataset)]
    assert found == expected | ns
    # A PTR where the cluster has a reverse zone for the address: the IPv4 host in the VMs' /24; IPv6 and 10.99/16
    # have none.
    ptrs = {}
    for path, text in zones.items():
        if path.name.endswith(".in-addr.arpa.zone"):
            zone = dns.zone.from_text(str(text), origin=path.name.removesuffix("zone"), relativize=False,
                                      check_origin=True)
            for name, node in zone.nodes.items():
                for rdata in node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.PTR) or ():
                    ptrs[str(dns.reversename.to_address(name))] = rdata.target.to_text()
    assert {ip: fqdn for ip, fqdn in ptrs.items() if fqdn.split(".")[0] not in vm_names} == {
        "192.168.50.4": "kvm0.phys.example.org."}


def test_a_host_ptr_goes_in_the_zone_holding_its_address(example: Cluster) -> None:
    # dmz as a /25 is in the /24 zone 60.168.192 (no RFC 2317), which holds kvm1 outside the /25; as a /22 it is four
    # /24 zones, and nothing holds 192.168.70.7.
    networks = dict(example.site.networks)
    networks["dmz"] = dataclasses.replace(networks["dmz"], subnet=IPv4Network("192.168.60.0/25"))
    cluster = with_hosts(dataclasses.replace(example, site=dataclasses.replace(example.site, networks=networks)),
                         kvm1="192.168.60.200")  # in no network, but in dmz's /24 zone
    zones = dns_zones.render(cluster)
    assert sorted(p.name for p in zones) == ["50.168.192.in-addr.arpa.zone", "60.168.192.in-addr.arpa.zone",
                                             f"{DOMAIN}.zone"]
    dmz = dns.zone.from_text(str(zones[PurePosixPath("dns/60.168.192.in-addr.arpa.zone")]),
                             origin="60.168.192.in-addr.arpa.")
    lan = dns.zone.from_text(str(zones[PurePosixPath("dns/50.168.192.in-addr.arpa.zone")]),
                             origin="50.168.192.in-addr.arpa.")
    assert dmz.find_rdataset("200", dns.rdatatype.PTR)[0].target.to_text() == "kvm1.phys.example.org."
    assert lan.find_rdataset("4", dns.rdatatype.PTR)[0].target.to_text() == "kvm0.phys.example.org."
    networks["dmz"] = dataclasses.replace(networks["dmz"], subnet=IPv4Network("192.168.60.0/22"))
    cluster = with_hosts(dataclasses.replace(example, site=dataclasses.replace(example.site, networks=networks)),
                         kvm1="192.168.70.7")  # in no network and no zone: no PTR
    zones = dns_zones.render(cluster)
    assert all("kvm1" not in str(text) for path, text in zones.items() if path.name.endswith(".in-addr.arpa.zone"))


def test_a_host_at_the_provision_servers_address_has_its_ptr_and_ns_keeps_its_a_record(example: Cluster) -> None:
    # The provision server may be a physical host (dnsmasq running on kvm0 itself).
    provision = dataclasses.replace(example.site.provision, server=IPv4Address("192.168.50.4"), vm=None)
    cluster = dataclasses.replace(example, site=dataclasses.replace(example.site, provision=provision))
    zones = dns_zones.render(cluster)
    reverse = dns.zone.from_text(str(zones[PurePosixPath("dns/50.168.192.in-addr.arpa.zone")]),
                                 origin="50.168.192.in-addr.arpa.")
    assert [r.target.to_text() for r in reverse.find_rdataset("4", dns.rdatatype.PTR)] == ["kvm0.phys.example.org."]
    forward = dns.zone.from_text(str(zones[PurePosixPath(f"dns/{DOMAIN}.zone")]), origin=f"{DOMAIN}.")
    assert [r.address for r in forward.find_rdataset("ns", dns.rdatatype.A)] == ["192.168.50.4"]
    assert [r.address for r in forward.find_rdataset("kvm0", dns.rdatatype.A)] == ["192.168.50.4"]


def test_a_host_called_ns_is_the_name_servers_record_like_a_vm_called_ns(example: Cluster) -> None:
    cluster = with_hosts(example, ns="192.168.50.6")
    forward = dns.zone.from_text(str(dns_zones.render(cluster)[PurePosixPath(f"dns/{DOMAIN}.zone")]),
                                 origin=f"{DOMAIN}.")
    assert [r.address for r in forward.find_rdataset("ns", dns.rdatatype.A)] == ["192.168.50.6"]  # one, not two
    hosts = _entries(str(dnsmasq.render(cluster)[PurePosixPath("dnsmasq/hosts")]))
    assert [entry for entry in hosts if "ns" in entry] == [["192.168.50.6", f"ns.{DOMAIN}", "ns"]]  # here too


@pytest.mark.parametrize(("server", "line"), [
    ("192.168.50.4", ["192.168.50.4", f"kvm0.{DOMAIN}", "kvm0", f"ns.{DOMAIN}", "ns"]),  # dnsmasq runs on kvm0
    ("192.168.50.9", ["192.168.50.9", f"ns.{DOMAIN}", "ns"]),  # an address of no VM or host: ns first, its PTR
], ids=["a-host", "no-vm-or-host"])
def test_dnsmasq_answers_the_name_servers_name_as_the_zones_do(example: Cluster, server: str,
                                                                line: list[str]) -> None:
    """The zones' NS record names ns.<domain>; dnsmasq, which VMs ask, used not to know that name."""
    provision = dataclasses.replace(example.site.provision, server=IPv4Address(server), vm=None)
    cluster = dataclasses.replace(example, site=dataclasses.replace(example.site, provision=provision))
    hosts = _entries(str(dnsmasq.render(cluster)[PurePosixPath("dnsmasq/hosts")]))
    assert [entry for entry in hosts if "ns" in entry] == [line]
    reverse = dns.zone.from_text(str(dns_zones.render(cluster)[PurePosixPath("dns/50.168.192.in-addr.arpa.zone")]),
                                 origin="50.168.192.in-addr.arpa.")
    ptr = reverse.find_rdataset(server.rsplit(".", 1)[1], dns.rdatatype.PTR)
    assert [r.target.to_text() for r in ptr] == [f"{line[1]}."]  # the first name, which gives dnsmasq's PTR


# --- a real dnsmasq ---------------------------------------------------------------------------------------------

# The DNS part of the generated dnsmasq.conf; the rest (DHCP, TFTP, interface=) needs the provision network.
DNS_KEYS = ("domain", "local", "no-hosts", "addn-hosts", "domain-needed")


def _ask(port: int, name: str, rdtype: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=2)


@pytest.fixture
def answering(example: Cluster, tmp_path: Path) -> Iterator[int]:
    """dnsmasq on 127.0.0.1 with the DNS lines of the generated dnsmasq.conf and dnsmasq/hosts of varied(); its port."""
    tree = dnsmasq.render(varied(example))
    hosts = tmp_path / "hosts"
    hosts.write_text(str(tree[PurePosixPath("dnsmasq/hosts")]))
    lines = [line for line in str(tree[PurePosixPath("dnsmasq/dnsmasq.conf")]).splitlines()
             if line.split("=", 1)[0] in DNS_KEYS]
    assert sorted({line.split("=", 1)[0] for line in lines}) == sorted(DNS_KEYS), lines
    port = _free_udp_port()
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text("\n".join([*(f"addn-hosts={hosts}" if line.startswith("addn-hosts=") else line for line in lines),
                               f"port={port}", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv"]) + "\n")
    # Root (as tests run) reads tmp_path, which dnsmasq's default user could not; no upstream: never leaves loopback.
    process = subprocess.Popen([require_tool("dnsmasq"), "--keep-in-foreground", f"--conf-file={conf}",
                                f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--log-facility=-", "--user=root",
                                "--group=root"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _ask(port, f"kvm0.{DOMAIN}", "A")
                break
            except dns.exception.Timeout:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"dnsmasq did not answer on port {port}: {process.communicate()[0]}")
        yield port
    finally:
        process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def _answer(response: dns.message.Message) -> list[str]:
    assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


@pytest.mark.consumer
@pytest.mark.services
def test_dnsmasq_answers_the_hosts_by_short_name_fqdn_and_address(example: Cluster, answering: int) -> None:
    port = answering
    assert _answer(_ask(port, "kvm0", "A")) == ["192.168.50.4"]
    assert _answer(_ask(port, f"kvm0.{DOMAIN}", "A")) == ["192.168.50.4"]
    assert _answer(_ask(port, "kvm1", "AAAA")) == ["2001:db8::5"]
    assert _answer(_ask(port, f"kvm1.{DOMAIN}", "AAAA")) == ["2001:db8::5"]
    assert _answer(_ask(port, f"kvm6.{DOMAIN}", "A")) == ["10.99.0.6"]
    assert _answer(_ask(port, "4.50.168.192.in-addr.arpa", "PTR")) == [f"kvm0.{DOMAIN}."]
    assert _answer(_ask(port, dns.reversename.from_address("2001:db8::5").to_text(), "PTR")) == [f"kvm1.{DOMAIN}."]
    assert _answer(_ask(port, f"web.{DOMAIN}", "A")) == ["192.168.50.21"]  # the VMs are still there
    # The zones' name server, the provision VM, by its second name; the PTR keeps its first.
    assert _answer(_ask(port, f"ns.{DOMAIN}", "A")) == ["192.168.50.2"]
    assert _answer(_ask(port, "2.50.168.192.in-addr.arpa", "PTR")) == [f"provision.{DOMAIN}."]
    # A host whose address is a DNS name has no record: the domain is dnsmasq's alone (local=), so no answer.
    unknown = _ask(port, f"kvm2.{DOMAIN}", "A")
    assert (unknown.rcode(), unknown.answer) == (dns.rcode.NXDOMAIN, [])
