"""dnsmasq: golden files, what adding a VM changes, and `dnsmasq --test` on a staged configuration."""

from __future__ import annotations

import dataclasses
import re
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath

import pytest

from generators import dnsmasq, pxe
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
    for address, fqdn, name in rows:
        vm = example.vm(name)
        assert (IPv4Address(address), fqdn) == (vm.ip, f"{name}.{example.site.domain}")


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
