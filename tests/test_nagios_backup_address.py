"""The Nagios backup check's target: each host's address, else its remote URI's host, and one the Nagios VM resolves.

The check runs check_by_ssh on the Nagios VM, whose only name server is the cluster's dnsmasq: a host
with no address, or a name that dnsmasq cannot answer, would make every BACKUP check fail on a cluster
that looks fine, so `make` refuses it, naming the [hosts.<name>] table.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest

from generators import dnsmasq, nagios
from generators.__main__ import main
from generators.errors import ConfigError
from generators.model import Cluster
from tests.test_cli import run, snapshot
from tests.tools import ROOT, require_module, require_tool

KVM0_ADDRESS = re.compile(r'^address = "192\.168\.50\.4".*$', re.M)
KVM1_ADDRESS = re.compile(r'^address = "192\.168\.50\.5".*$', re.M)
EXPECTED = 'expected address = "IP" of the host, or a DNS name outside phys.example.org, or backup=no on those VMs'
NO_ADDRESS = ("38:1: table '[hosts.kvm0]' needs an address: the Nagios backup check of its 6 backed-up VMs (provision,"
              f" mcp, ldap, ...) reaches the host over SSH, and its uri 'qemu:///system' names no host ({EXPECTED})")


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    for name in ("cluster.conf", "site.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _with_host(cluster: Cluster, name: str, **changes: object) -> Cluster:
    hosts = dict(cluster.site.hosts)
    hosts[name] = dataclasses.replace(hosts[name], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts))


def _problems(cluster: Cluster) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        nagios.render(cluster)
    return [str(problem) for problem in caught.value.problems]


def test_each_backed_up_vm_is_checked_on_its_hosts_address(example: Cluster) -> None:
    assert nagios.backup_targets(example) == [(vm.name, {"kvm0": "192.168.50.4", "kvm1": "192.168.50.5"}[vm.host], 22)
                                              for vm in example.vms if vm.backup]
    text = nagios.render(example)[PurePosixPath("nagios/backup.cfg")]
    assert isinstance(text, str)
    assert "    check_command           kvmconf-check-backup!192.168.50.5!22\n" in text


def test_make_refuses_a_backed_up_host_without_address_and_writes_nothing(inputs: Path) -> None:
    assert run(cwd=inputs).returncode == 0  # a build/ from an earlier, good run
    before = snapshot(inputs / "build")
    site = inputs / "site.toml"
    site.write_text(KVM0_ADDRESS.sub("", site.read_text(), count=1))  # the line stays, empty: same line numbers
    result = run("--force", cwd=inputs)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [f"site.toml:{NO_ADDRESS}", "kvmconf: 1 problem; nothing was written"]
    assert snapshot(inputs / "build") == before
    assert [p.name for p in inputs.iterdir() if p.name.startswith(".kvmconf-staging")] == []
    # --check says what make would: it renders too (in memory).
    check = run("--check", cwd=inputs)
    assert (check.returncode, check.stderr.splitlines()[0]) == (1, f"site.toml:{NO_ADDRESS}")


@pytest.mark.parametrize(("host", "changes", "at", "why"), [
    ("kvm1", {"address": None}, "60:1: key 'hosts.kvm1.uri'",
     "at 'kvm1.phys.example.org' (its uri's host), and the VMs' only name server, the"
     " cluster's dnsmasq, answers phys.example.org only with cluster.conf's VMs and the hosts whose address is an IP"),
    ("kvm1", {"address": "KVM1.Phys.Example.Org"}, "64:1: key 'hosts.kvm1.address'",
     "at 'KVM1.Phys.Example.Org' (its address), and the VMs' only"
     " name server, the cluster's dnsmasq, answers phys.example.org only with cluster.conf's VMs and the hosts whose"
     " address is an IP"),
    ("kvm0", {"address": "kvm0"}, "44:1: key 'hosts.kvm0.address'",
     "at 'kvm0' (its address), and the VMs' only name server, the cluster's dnsmasq,"
     " forwards no name without a dot"),
])
def test_a_name_the_cluster_dns_cannot_answer_is_refused(example: Cluster, host: str, changes: dict[str, object],
                                                         at: str, why: str) -> None:
    # Shown at the key at fault: the address, else the uri whose host stood in for it.
    vms = "1 backed-up VM (compute1)" if host == "kvm1" else "6 backed-up VMs (provision, mcp, ldap, ...)"
    assert _problems(_with_host(example, host, **changes)) == [
        f"site.toml:{at}: host {host!r} needs an address the VMs can resolve: the Nagios backup check of"
        f" its {vms} reaches the host over SSH {why} ({EXPECTED})"]


@pytest.mark.parametrize("dns", ["our dnsmasq", "other name servers"])
@pytest.mark.parametrize("alias", ["kvm_1", "kvm1$(reboot)"])
def test_a_uris_host_that_is_no_dns_name_is_no_fallback(example: Cluster, dns: str, alias: str) -> None:
    # site.toml takes such a URI (ssh resolves an ssh config alias for libvirt); as the check's target it is no
    # address, whatever name servers the VMs ask: check_by_ssh would get a name nobody resolves, or a shell command.
    uri = f"qemu+ssh://root@{alias}/system"
    if dns == "other name servers":
        networks = {name: dataclasses.replace(net, dns_servers=(IPv4Address("192.168.50.53"),))
                    for name, net in example.site.networks.items()}
        example = dataclasses.replace(example, site=dataclasses.replace(example.site, networks=networks))
    expected = EXPECTED if dns == "our dnsmasq" else EXPECTED.replace(" outside phys.example.org", "")
    assert _problems(_with_host(example, "kvm1", address=None, uri=uri)) == [
        f"site.toml:60:1: key 'hosts.kvm1.uri': host 'kvm1' needs an address: the Nagios backup check of its 1"
        " backed-up VM"
        f" (compute1) reaches the host over SSH, and its uri {uri!r} names host {alias!r}, which is not an IP"
        f" address or DNS name (an ssh config alias?) ({expected})"]


def test_every_host_without_a_usable_address_is_reported_at_once(example: Cluster) -> None:
    cluster = _with_host(_with_host(example, "kvm0", address=None), "kvm1", address=None)
    problems = _problems(cluster)
    assert [p.split(": ")[0] for p in problems] == ["site.toml:38:1", "site.toml:60:1"]  # kvm0's table, kvm1's uri
    assert problems[0] == f"site.toml:{NO_ADDRESS}"


def test_names_the_vms_can_resolve_are_taken(example: Cluster) -> None:
    # Outside the cluster's domain, dnsmasq forwards the name to its own upstream servers.
    outside = _with_host(example, "kvm1", address="kvm1.mgmt.example.net")
    assert ("compute1", "kvm1.mgmt.example.net", 22) in nagios.backup_targets(outside)
    # Where a network hands out other name servers, those may know the host: its URI's name is taken as it is.
    networks = {name: dataclasses.replace(net, dns_servers=(IPv4Address("192.168.50.53"),))
                for name, net in example.site.networks.items()}
    other_dns = _with_host(dataclasses.replace(example, site=dataclasses.replace(example.site, networks=networks)),
                           "kvm1", address=None)
    assert ("compute1", "kvm1.phys.example.org", 22) in nagios.backup_targets(other_dns)


@pytest.mark.parametrize(("uri", "address", "port"), [
    ("qemu+ssh://admin@kvm1.mgmt.example.net:2222/system", None, 2222),  # the URI's host, so its port
    ("qemu+ssh://admin@kvm1.mgmt.example.net/system", None, 22),
    ("qemu+ssh://admin@kvm1.mgmt.example.net:2222/system", "192.168.50.5", 22),  # another name: its own port
    ("qemu+tls://kvm1.mgmt.example.net:16514/system", None, 22),  # libvirtd's TLS port, not SSH's
])
def test_the_check_uses_the_port_of_the_uri_whose_host_it_reaches(example: Cluster, uri: str, address: str | None,
                                                                  port: int) -> None:
    cluster = _with_host(example, "kvm1", uri=uri, address=address)
    assert ("compute1", address or "kvm1.mgmt.example.net", port) in nagios.backup_targets(cluster)
    text = nagios.render(cluster)[PurePosixPath("nagios/backup.cfg")]
    assert isinstance(text, str)
    assert f"    check_command           kvmconf-check-backup!{address or 'kvm1.mgmt.example.net'}!{port}\n" in text
    assert "check_by_ssh -H $ARG1$ -p $ARG2$ -l root " in text


def test_a_host_without_backed_up_vms_needs_no_address(example: Cluster) -> None:
    local = _with_host(example, "kvm1", address=None, uri="qemu:///system")
    cluster = dataclasses.replace(local, vms=tuple(dataclasses.replace(vm, backup=False) if vm.host == "kvm1" else vm
                                                   for vm in local.vms))
    text = nagios.render(cluster)[PurePosixPath("nagios/backup.cfg")]
    assert isinstance(text, str)
    assert "host_name               compute1\n" not in text and "host_name               web\n" in text


# --- the rule's premise, asked of a real dnsmasq --------------------------------------------------------------


@pytest.fixture
def cluster_dns(example: Cluster, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dnsmasq on 127.0.0.1 with the DNS lines of the generated dnsmasq.conf: its port, and its query log.

    Its one upstream server is a loopback port nothing listens on: a forwarded name never leaves this
    machine, and the log tells it apart from a name dnsmasq answers itself.
    """
    tree = dnsmasq.render(example)
    conf, hosts = tree[PurePosixPath("dnsmasq/dnsmasq.conf")], tree[PurePosixPath("dnsmasq/hosts")]
    assert isinstance(conf, str) and isinstance(hosts, str)
    (tmp_path / "hosts").write_text(hosts)
    dns_keys = ("domain", "local", "domain-needed", "no-hosts")
    lines = [line for line in conf.splitlines() if line.split("=", 1)[0] in dns_keys]
    assert sorted(line.split("=", 1)[0] for line in lines) == sorted(dns_keys), "dnsmasq.conf's DNS lines changed"
    port, upstream, log = _free_udp_port(), _free_udp_port(), tmp_path / "dnsmasq.log"
    lines += [f"addn-hosts={tmp_path / 'hosts'}", f"port={port}", "listen-address=127.0.0.1", "bind-interfaces",
              "no-resolv", f"server=127.0.0.1#{upstream}", f"pid-file={tmp_path / 'pid'}", "log-queries",
              f"log-facility={log}", f"user={pwd.getpwuid(os.getuid()).pw_name}"]
    (tmp_path / "dnsmasq.conf").write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([require_tool("dnsmasq"), "--keep-in-foreground", "-C", str(tmp_path / "dnsmasq.conf")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while _rcode(port, "web.phys.example.org") != "NOERROR":  # a VM: the staged config serves
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dnsmasq does not answer: {process.poll()=}")
            time.sleep(0.1)
        yield port, log
    finally:
        process.terminate()
        process.wait(timeout=10)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rcode(port: int, name: str) -> str:
    """dnsmasq's answer to an A query for name, or "no answer" (a forwarded name: the upstream is not there)."""
    message, query, rcode = (require_module(f"dns.{name}") for name in ("message", "query", "rcode"))
    try:
        reply = query.udp(message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
    except (OSError, require_module("dns.exception").Timeout):
        return "no answer"
    return str(rcode.to_text(reply.rcode()))


@pytest.mark.consumer
@pytest.mark.services
def test_the_cluster_dnsmasq_answers_exactly_the_names_the_check_takes(example: Cluster,
                                                                       cluster_dns: tuple[int, Path]) -> None:
    port, log = cluster_dns
    # kvm0 and kvm1 have IP addresses, so dnsmasq/hosts has their names (generators/host_records.py); kvm9 is none.
    names = ("kvm9.phys.example.org", "kvm9", "kvm1.phys.example.org", "kvm0", "kvm0.mgmt.example.net")
    answers = {name: _rcode(port, name) for name in names}
    for name in names:
        refused = nagios._unresolvable(example, name) is not None
        # Refused: dnsmasq says NXDOMAIN itself ("config"). Taken: it answers from its hosts file, or forwards the
        # name to its name servers.
        assert (answers[name] == "NXDOMAIN") == refused, (name, answers)
        assert (f"config {name} is NXDOMAIN" in log.read_text()) == refused, log.read_text()
        from_hosts = f"/hosts {name} is " in log.read_text()
        assert (from_hosts or f"forwarded {name} to 127.0.0.1#" in log.read_text()) != refused, log.read_text()
        assert from_hosts == (answers[name] == "NOERROR"), (name, answers, log.read_text())
    assert [name for name in names if nagios._unresolvable(example, name)] == ["kvm9.phys.example.org", "kvm9"]
    assert [name for name in names if answers[name] == "NOERROR"] == ["kvm1.phys.example.org", "kvm0"]


# --- every input the project ships builds under the rule ---------------------------------------------------------

FIXTURES = ROOT / "tests" / "fixtures"


def _bench(name: str) -> ModuleType:
    """A bench script as a module (bench/ is no package), for the inputs it writes; its main() is not run."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("cluster", "site"), [
    ("lab-cluster.conf", "lab-site.toml"), ("pxe-cluster.conf", "lab-site.toml"),
    ("nics-cluster.conf", "nics-site.toml"),
])
def test_the_fixtures_pass_check(cluster: str, site: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(p.name for p in FIXTURES.glob("*site*.toml")) == ["lab-site.toml", "nics-site.toml"]  # all tested
    assert main(["--check", "--cluster", str(FIXTURES / cluster), "--site", str(FIXTURES / site)]) == 0
    assert capsys.readouterr().out.endswith(" VMs, valid\n")


def test_the_benches_inputs_pass_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_module("libvirt")  # provision_bench imports it
    generate, provision = _bench("generate_bench"), _bench("provision_bench")
    inputs = {"generate": (generate.cluster_conf(300, 50), generate.site_toml(50)),  # the default host count
              "provision": (provision.cluster_conf(10), provision.site_toml())}
    for name, (cluster_text, site_text) in inputs.items():
        cluster, site = tmp_path / f"{name}.conf", tmp_path / f"{name}.toml"
        cluster.write_text(cluster_text)
        site.write_text(site_text)
        assert main(["--check", "--cluster", str(cluster), "--site", str(site)]) == 0, name
    assert capsys.readouterr().out.count(" VMs, valid\n") == 2
