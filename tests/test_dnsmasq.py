"""dnsmasq: golden files, what adding a VM changes, and `dnsmasq --test` on a staged configuration."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from generators import dnsmasq, pxe
from generators.errors import Location
from generators.model import Cluster, Install
from tests.golden import assert_golden
from tests.tools import require_tool, run

CONF = PurePosixPath("dnsmasq/dnsmasq.conf")
HOSTS = PurePosixPath("dnsmasq/hosts")
HOSTS_DIR = PurePosixPath("dnsmasq/dhcp-hosts")


def _with_new_vm(cluster: Cluster) -> Cluster:
    template = cluster.vm("ldap")
    new = dataclasses.replace(template, name="newvm", mac="52:54:00:50:00:99", ip=IPv4Address("192.168.50.99"),
                              line=template.line + 100)
    return dataclasses.replace(cluster, vms=(*cluster.vms, new))


def _data_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _host_line(tree: dict[PurePosixPath, str | bytes], name: str) -> str:
    content = tree[HOSTS_DIR / name]
    assert isinstance(content, str)
    lines = _data_lines(content)
    assert len(lines) == 1, content
    return lines[0]


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("dnsmasq", dnsmasq.render(example), regenerate)


def test_adding_a_vm_leaves_the_conf_alone_and_adds_one_hostsfile(example: Cluster) -> None:
    before = dnsmasq.render(example)
    after = dnsmasq.render(_with_new_vm(example))
    assert after[CONF] == before[CONF]  # so SIGHUP is enough: it re-reads hostsfiles and addn-hosts, not the conf
    assert set(after) - set(before) == {HOSTS_DIR / "newvm"}
    assert set(before) - set(after) == set()
    changed = {path for path in before if before[path] != after[path]}
    assert changed == {HOSTS}
    assert _host_line(after, "newvm") == "52:54:00:50:00:99,192.168.50.99,newvm,infinite"


def test_conf_has_no_vm_in_it(example: Cluster) -> None:
    conf = dnsmasq.render(example)[CONF]
    assert isinstance(conf, str)
    assert not any(vm.mac in conf for vm in example.vms)
    assert not any(line.startswith(("dhcp-host=", "host-record=", "address=")) for line in conf.splitlines())


def test_hostsfile_lines_carry_no_tags(example: Cluster) -> None:
    # dnsmasq 2.90 segfaulted on SIGHUP after answering a VM whose hostsfile line set a tag (seen in the lab).
    tree = dnsmasq.render(example)
    assert {vm.install for vm in example.vms} == set(Install), "the example should cover every install kind"
    for vm in example.vms:
        fields = _host_line(tree, vm.name).split(",")
        expected = [vm.mac, str(vm.ip), vm.name, "infinite"]
        assert fields == expected


def test_hosts_file_is_sorted_by_address_then_name(example: Cluster) -> None:
    hosts = dnsmasq.render(example)[HOSTS]
    assert isinstance(hosts, str)
    rows = [line.split() for line in _data_lines(hosts)]
    # The VMs, then the physical hosts with an IP address (tests/test_host_records.py).
    assert rows[-2:] == [["192.168.50.4", "kvm0.phys.example.org", "kvm0"],
                         ["192.168.50.5", "kvm1.phys.example.org", "kvm1"]]
    rows = rows[:-2]
    assert [IPv4Address(row[0]) for row in rows] == sorted(vm.ip for vm in example.vms)
    # Numeric, not text order: .21 comes before .101.
    assert [row[2] for row in rows].index("web") < [row[2] for row in rows].index("compute1")
    for address, fqdn, name, *aliases in rows:
        vm = example.vm(name)
        assert (IPv4Address(address), fqdn) == (vm.ip, f"{name}.{example.site.domain}")
        # The zones' NS name is the provision VM's too, after its own names: those give the PTR.
        assert aliases == (["ns.phys.example.org", "ns"] if name == "provision" else []), name


def test_each_network_gets_a_tagged_static_range_router_and_name_servers(example: Cluster) -> None:
    dmz = dataclasses.replace(example.site.networks["dmz"], dns_servers=())
    site = dataclasses.replace(example.site, networks={**example.site.networks, "dmz": dmz})
    conf = dnsmasq.render(dataclasses.replace(example, site=site))[CONF]
    assert isinstance(conf, str)
    lines = conf.splitlines()
    assert "dhcp-range=set:lan,192.168.50.0,static,255.255.255.0,12h" in lines
    assert "dhcp-option=tag:lan,option:router,192.168.50.1" in lines
    assert "dhcp-option=tag:lan,option:dns-server,192.168.50.2" in lines
    assert "dhcp-range=set:dmz,192.168.60.0,static,255.255.255.0,12h" in lines
    # dmz has no dns list now: its VMs are told to ask the provision server.
    assert f"dhcp-option=tag:dmz,option:dns-server,{example.site.provision.server}" in lines
    assert not any(line.startswith("port=") for line in lines)  # the installer needs DNS


def test_conf_points_at_the_deployed_files(example: Cluster) -> None:
    conf = dnsmasq.render(example)[CONF]
    assert isinstance(conf, str)
    lines = conf.splitlines()
    provision = example.site.provision
    assert f"dhcp-hostsfile={provision.config_dir}/dnsmasq/dhcp-hosts" in lines
    assert f"addn-hosts={provision.config_dir}/dnsmasq/hosts" in lines
    assert f"tftp-root={provision.tftp_root}" in lines
    assert f"interface={provision.interface}" in lines
    assert "dhcp-ignore=tag:!known" in lines


def test_tftp_names_come_from_generators_pxe(example: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The boot files dnsmasq hands out are those pxe.py (and provision_server, which installs them) spell."""
    before = dnsmasq.render(example)[CONF]
    assert isinstance(before, str)
    old = dnsmasq.tftp_names()
    for name, value in (("PXELINUX_BOOT_FILE", "bios/lpxelinux.0"), ("PXELINUX_LDLINUX", "bios/ldlinux.e64"),
                        ("PXELINUX_CFG_DIR", "bios/cfg"), ("PXELINUX_DEFAULT", "bios/cfg/fallback"),
                        ("GRUB_DIR", "uefi"), ("GRUB_CFG", "uefi/main.cfg"), ("GRUB_EFI_IMAGE", "uefi/core.efi")):
        monkeypatch.setattr(pxe, name, value)
    conf = dnsmasq.render(example)[CONF]
    assert isinstance(conf, str)
    lines = conf.splitlines()
    assert "dhcp-boot=tag:!efi-x86_64,bios/lpxelinux.0" in lines
    assert "dhcp-boot=tag:efi-x86_64,uefi/core.efi" in lines
    assert "# BIOS: bios/lpxelinux.0 needs bios/ldlinux.e64 beside it and reads bios/cfg/01-<mac> (else" \
           " bios/cfg/fallback)." in lines
    assert "# UEFI: a GRUB EFI image whose prefix is /uefi, so that it reads uefi/main.cfg (see generators/pxe.py" \
           " for how" in lines
    # Debian's own netboot image is the one name of this kind that is not ours: the comment warns against it.
    debian = "# Invalid Parameter\"). Not Debian's netboot grubx64.efi as is: its built-in prefix is"
    assert debian in lines
    words = {word.rstrip(".") for line in lines if line != debian for word in re.findall(r"[^\s,()]+", line)}
    assert words & set(old.values()) == set()
    # Control: the unpatched conf does hold the old names, so the check above can fail.
    assert all(value in before for value in old.values())


# --- dnsmasq --test -------------------------------------------------------------------------------------------


def _stage(tree: dict[PurePosixPath, str | bytes], tmp_path: Path) -> Path:
    """A copy of dnsmasq.conf that `dnsmasq --test` can check whole.

    --test does not read dhcp-hostsfile, so every hostsfile line is inlined as `dhcp-host=<line>`
    (the same syntax, by the man page); the deployed paths point into tmp_path instead.
    """
    hosts = tmp_path / "hosts"
    content = tree[HOSTS]
    assert isinstance(content, str)
    hosts.write_text(content)
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    replaced = {"addn-hosts": f"addn-hosts={hosts}", "tftp-root": f"tftp-root={tftp}", "dhcp-hostsfile": None}
    conf = tree[CONF]
    assert isinstance(conf, str)
    lines: list[str] = []
    seen = set()
    for line in conf.splitlines():
        key = line.split("=", 1)[0]
        if key in replaced:
            seen.add(key)
            new = replaced[key]
            if new is not None:
                lines.append(new)
        else:
            lines.append(line)
    assert seen == set(replaced), "dnsmasq.conf no longer has the lines this staging rewrites"
    for path in sorted(tree):
        if path.parent == HOSTS_DIR:
            content = tree[path]
            assert isinstance(content, str)
            lines.extend(f"dhcp-host={line}" for line in _data_lines(content))
    staged = tmp_path / "dnsmasq.conf"
    staged.write_text("\n".join(lines) + "\n")
    return staged


@pytest.mark.consumer
def test_dnsmasq_accepts_the_conf_with_every_hostsfile_line(example: Cluster, tmp_path: Path) -> None:
    tree = dnsmasq.render(example)
    staged = _stage(tree, tmp_path)
    assert sum(line.startswith("dhcp-host=") for line in staged.read_text().splitlines()) == len(example.vms)
    result = run([require_tool("dnsmasq"), "--test", "-C", str(staged)])
    assert result.returncode == 0, result.stderr
    assert "syntax check OK" in result.stdout + result.stderr


@pytest.mark.consumer
def test_dnsmasq_staging_catches_a_broken_hostsfile_line(example: Cluster, tmp_path: Path) -> None:
    tree = dict(dnsmasq.render(example))
    tree[HOSTS_DIR / "ldap"] = "52:54:00:zz:00:10,192.168.50.10,ldap,infinite\n"
    result = run([require_tool("dnsmasq"), "--test", "-C", str(_stage(tree, tmp_path))])
    assert result.returncode != 0
    assert "bad hex constant" in result.stderr
    assert "syntax check OK" not in result.stdout + result.stderr


# --- [provision] upstream_dns: where names outside the cluster go ----------------------------------------------


def _with_upstream(cluster: Cluster, upstream: tuple[str, ...] | None, **changes: Any) -> Cluster:
    servers = None if upstream is None else tuple(IPv4Address(ip) for ip in upstream)
    provision = dataclasses.replace(cluster.site.provision, upstream_dns=servers, **changes)
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, provision=provision))


def _conf_lines(cluster: Cluster) -> list[str]:
    conf = dnsmasq.render(cluster)[CONF]
    assert isinstance(conf, str)
    return conf.splitlines()


def _forwarding(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("no-resolv", "server=", "resolv-file="))]


def test_upstream_dns_replaces_resolv_conf_with_one_server_line_each(example: Cluster) -> None:
    lines = _conf_lines(_with_upstream(example, ("192.168.50.1", "10.0.0.53")))
    assert _forwarding(lines) == ["no-resolv", "server=192.168.50.1", "server=10.0.0.53"]  # dnsmasq tries in order


def test_without_upstream_dns_the_conf_says_names_go_to_resolv_conf(example: Cluster) -> None:
    lines = _conf_lines(_with_upstream(example, None))
    assert _forwarding(lines) == []
    assert "# Other names go to the name servers of this server's /etc/resolv.conf ([provision] upstream_dns in" \
           " site.toml" in lines


def test_empty_upstream_dns_forwards_nothing(example: Cluster) -> None:
    lines = _conf_lines(_with_upstream(example, ()))
    assert _forwarding(lines) == ["no-resolv"]
    assert "# No other name is answered ([provision] upstream_dns = [] in site.toml): /etc/resolv.conf is not read." \
           in lines


def _upstream_problems(cluster: Cluster) -> list[str]:
    return [problem.message for problem in dnsmasq.upstream_dns_problems(cluster, lambda table, key: Location(
        "site.toml", 1, 1))]


def test_upstream_dns_is_needed_only_where_the_provision_vm_would_ask_itself(example: Cluster) -> None:
    """The example's lan (the provision VM's network) hands out the VM alone: without upstream_dns, refused.

    tests/test_bad_input.py has the exact messages; these are the cases that must pass.
    """
    alone = _with_upstream(example, None)
    assert _upstream_problems(alone) != []  # control: the cases below differ from it in one thing each
    lan = dataclasses.replace(alone.site.networks["lan"], dns_servers=(IPv4Address("192.168.50.2"),
                                                                       IPv4Address("192.168.50.1")))
    another = dataclasses.replace(alone, site=dataclasses.replace(alone.site, networks={**alone.site.networks,
                                                                                         "lan": lan}))
    assert _upstream_problems(another) == []  # its resolv.conf names 192.168.50.1 too, which dnsmasq uses
    # A provision server that is no VM has a resolv.conf of the admin's making: kept, and the conf says so.
    assert _upstream_problems(_with_upstream(example, None, vm=None, server=IPv4Address("192.168.50.4"))) == []
    assert _upstream_problems(_with_upstream(example, ())) == []  # [] says: no names outside the cluster


@pytest.mark.consumer
def test_dnsmasq_accepts_the_upstream_dns_lines(example: Cluster, tmp_path: Path) -> None:
    staged = _stage(dnsmasq.render(_with_upstream(example, ("192.168.50.1", "10.0.0.53"))), tmp_path)
    assert "no-resolv\nserver=192.168.50.1\nserver=10.0.0.53\n" in staged.read_text()
    result = run([require_tool("dnsmasq"), "--test", "-C", str(staged)])
    assert result.returncode == 0, result.stderr
    assert "syntax check OK" in result.stdout + result.stderr
    # Control: --test does read server= lines, so the check above could fail.
    staged.write_text(staged.read_text().replace("server=10.0.0.53", "server=10.0.0.300"))
    result = run([require_tool("dnsmasq"), "--test", "-C", str(staged)])
    assert result.returncode != 0 and "syntax check OK" not in result.stdout + result.stderr


# A name server for everything: it answers every A question with this address (a documentation address).
UPSTREAM_ANSWER = "203.0.113.7"
FAKE_UPSTREAM = f"""
import socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    query, peer = sock.recvfrom(512)
    end = 12
    while query[end]:
        end += query[end] + 1
    answer = b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("{UPSTREAM_ANSWER}")
    sock.sendto(query[:2] + b"\\x81\\x80" + struct.pack(">HHHH", 1, 1, 0, 0) + query[12:end + 5] + answer, peer)
"""
# Ask a name server for a name's A record: prints the response code and the first answer's address.
ASK = """
import socket, struct, sys
name = b"".join(bytes([len(label)]) + label.encode() for label in sys.argv[2].split(".")) + b"\\0"
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(2)
sock.sendto(struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1), (sys.argv[1], 53))
reply = sock.recv(512)
print(reply[3] & 15, socket.inet_ntoa(reply[-4:]) if struct.unpack(">H", reply[6:8])[0] else "-")
"""


def _ask(netns: str, server: str, name: str) -> str:
    """The answer of `server` for `name` (rcode and address), retried while dnsmasq is still starting."""
    deadline = time.monotonic() + 10
    while True:
        result = run(["ip", "netns", "exec", netns, sys.executable, "-c", ASK, server, name])
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()
        time.sleep(0.2)


def _resolve_outside_name(cluster: Cluster, netns: str, tmp_path: Path) -> str:
    """What a VM asking the provision server's dnsmasq (the generated conf) gets for deb.debian.org.

    In `netns`: the provision server at 192.168.50.2 on one end of a veth pair, a name server at 192.168.50.1 (the
    example's gateway) on the other, and a resolv.conf naming the provision server only, as cloud-init writes it
    for the example's provision VM.
    """
    dnsmasq_path = require_tool("dnsmasq")
    staged = _stage(dnsmasq.render(cluster), tmp_path)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.168.50.2\n")
    conf = staged.read_text().replace(f"interface={cluster.site.provision.interface}\n", "interface=kvmconf-p0\n")
    staged.write_text(conf + f"resolv-file={resolv}\ndhcp-leasefile={tmp_path / 'leases'}\nuser=root\n")
    ns = ["ip", "netns", "exec", netns]
    for command in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "kvmconf-p0", "type", "veth", "peer", "name", "kvmconf-p1"],
                    ["ip", "addr", "add", "192.168.50.2/24", "dev", "kvmconf-p0"],
                    ["ip", "addr", "add", "192.168.50.1/24", "dev", "kvmconf-p1"],
                    ["ip", "link", "set", "kvmconf-p0", "up"], ["ip", "link", "set", "kvmconf-p1", "up"]):
        subprocess.run([*ns, *command], check=True)
    upstream = subprocess.Popen([*ns, sys.executable, "-c", FAKE_UPSTREAM, "192.168.50.1"], stdout=subprocess.PIPE,
                                text=True)
    server = subprocess.Popen([*ns, dnsmasq_path, "--keep-in-foreground", "--log-facility=-", "-C", str(staged)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert upstream.stdout is not None and upstream.stdout.readline() == "ready\n"
        assert _ask(netns, "192.168.50.1", "deb.debian.org") == f"0 {UPSTREAM_ANSWER}"  # the name server works
        return _ask(netns, "192.168.50.2", "deb.debian.org")
    finally:
        for process in (server, upstream):
            process.terminate()
            process.wait(timeout=10)


@pytest.mark.consumer
@pytest.mark.services
def test_dnsmasq_forwards_names_outside_the_cluster_to_upstream_dns(example: Cluster, netns: str,
                                                                     tmp_path: Path) -> None:
    assert example.site.provision.upstream_dns == (IPv4Address("192.168.50.1"),)  # the example's
    assert _resolve_outside_name(example, netns, tmp_path) == f"0 {UPSTREAM_ANSWER}"


@pytest.mark.consumer
@pytest.mark.services
def test_dnsmasq_cannot_resolve_outside_names_when_resolv_conf_names_only_itself(example: Cluster, netns: str,
                                                                                 tmp_path: Path) -> None:
    """Why upstream_dns is needed: dnsmasq ignores its own address in resolv.conf and refuses the name (rcode 5)."""
    assert _resolve_outside_name(_with_upstream(example, None), netns, tmp_path) == "5 -"
