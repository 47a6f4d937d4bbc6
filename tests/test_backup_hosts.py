"""Which hosts of site.toml `invoke backup --all` (cron) and `backup-status` take as this machine.

The machine is given explicitly (hostname, addresses), as each physical host of the example would be:
no mock of the OS. One test runs the task as cron does, on this machine, against a site.toml that names
none of it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf import lab
from kvmconf.backup.cluster import RULE, Machine, require_this_machines_hosts, status_rows, this_machines_hosts
from kvmconf.errors import KvmconfError
from tests.labs import FIXTURES
from tests.tools import ROOT

KVM0 = Machine("kvm0", ("192.168.50.4", "10.9.0.4"))
KVM1 = Machine("kvm1.phys.example.org", ("192.168.50.5",))


def with_host(cluster: Cluster, name: str, **changes: str | None) -> Cluster:
    hosts = {**cluster.site.hosts, name: dataclasses.replace(cluster.site.hosts[name], **changes)}  # type: ignore[arg-type]
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts))


def test_each_host_of_the_example_backs_up_its_own_vms_and_none_twice(example: Cluster) -> None:
    # kvm0's uri qemu:///system is local on kvm1 too: kvm1 is named, so kvm0 is not taken there.
    assert this_machines_hosts(example, KVM0) == ["kvm0"]
    assert this_machines_hosts(example, KVM1) == ["kvm1"]
    assert set(this_machines_hosts(example, KVM0)).isdisjoint(this_machines_hosts(example, KVM1))


def test_a_host_is_named_by_its_key_its_address_or_its_uris_host(example: Cluster) -> None:
    assert this_machines_hosts(example, Machine("KVM1")) == ["kvm1"]  # key = hostname, case aside
    assert this_machines_hosts(example, Machine("node7", ("192.168.50.5",))) == ["kvm1"]  # address
    assert this_machines_hosts(example, Machine("kvm1.other.example.net")) == ["kvm1"]  # hostname without domain
    by_uri = with_host(example, "kvm1", address=None, uri="qemu+ssh://root@10.1.1.5:2222/system")
    assert this_machines_hosts(by_uri, Machine("node7", ("10.1.1.5",))) == ["kvm1"]  # the URI's host, an IP
    by_uri_name = with_host(example, "kvm1", address=None, uri="qemu+ssh://root@node7.phys.example.org/system")
    assert this_machines_hosts(by_uri_name, Machine("node7")) == ["kvm1"]  # the URI's host, a name
    by_address_name = with_host(example, "kvm1", address="node7.phys.example.org")
    assert this_machines_hosts(by_address_name, Machine("node7")) == ["kvm1"]  # an address that is a name
    by_ipv6 = with_host(example, "kvm1", address="2001:db8:50::5")
    assert this_machines_hosts(by_ipv6, Machine("node7", ("2001:db8:50:0::5",))) == ["kvm1"]  # IPv6, as a value
    by_ipv6_uri = with_host(example, "kvm1", address=None, uri="qemu+ssh://root@[2001:db8:50::5]:2222/system")
    assert this_machines_hosts(by_ipv6_uri, Machine("node7", ("2001:db8:50::5",))) == ["kvm1"]
    assert this_machines_hosts(by_ipv6_uri, Machine("node7", ("2001:db8:50::6",))) == ["kvm0"]  # not kvm1: local kvm0


def test_a_local_uri_counts_only_when_no_host_is_named_as_this_machine(example: Cluster) -> None:
    # A one-host site whose [hosts.kvm0] is not this machine's hostname: qemu:///system is still its libvirt.
    assert this_machines_hosts(example, Machine("server1", ("10.0.0.8",))) == ["kvm0"]
    local_too = with_host(example, "kvm1", uri="qemu+ssh://root@localhost/system")  # loopback: local as well
    assert this_machines_hosts(local_too, Machine("server1")) == ["kvm0", "kvm1"]
    assert this_machines_hosts(local_too, KVM1) == ["kvm1"]


def test_in_the_lab_every_host_is_this_machine() -> None:
    cluster = load_cluster(FIXTURES / "lab-cluster.conf", FIXTURES / "lab-site.toml")
    remapped = lab.remap(cluster, lab.Lab(Path("/var/tmp/lab"), "ns", hosts=["kvm0", "kvm1"]))
    assert this_machines_hosts(remapped, Machine("ci-runner", ("192.0.2.2",))) == ["kvm0", "kvm1"]


def test_no_host_of_site_toml_being_this_machine_is_an_error_naming_both(example: Cluster) -> None:
    remote = with_host(example, "kvm0", uri="qemu+ssh://root@kvm0.example.net/system")
    elsewhere = Machine("vm", ("192.0.2.2", "fd00::2"))
    assert this_machines_hosts(remote, elsewhere) == []
    with pytest.raises(KvmconfError) as err:
        require_this_machines_hosts(remote, elsewhere, "backup --all")
    assert str(err.value) == (
        "backup --all: no host of site.toml is this machine (hostname vm, addresses 192.0.2.2, fd00::2):"
        f" {RULE}. Its hosts: kvm0 (uri qemu+ssh://root@kvm0.example.net/system, address 192.168.50.4);"
        " kvm1 (uri qemu+ssh://root@kvm1.phys.example.org/system, address 192.168.50.5). Name this machine in"
        " site.toml ([hosts.<its hostname>], or its address), or run this on a host of it")
    with pytest.raises(KvmconfError, match=r"^backup-status: no host of site.toml is this machine \(hostname vm,"):
        status_rows(remote, [], elsewhere)


def test_status_defaults_to_the_vms_of_the_given_machines_hosts(example: Cluster, tmp_path: Path) -> None:
    site = dataclasses.replace(example.site, backup=dataclasses.replace(example.site.backup, dir=str(tmp_path)))
    cluster = dataclasses.replace(example, site=site)
    assert [r.vm for r in status_rows(cluster, [], KVM1)[0]] == ["compute1"]
    assert [r.vm for r in status_rows(cluster, [], KVM0)[0]] == ["provision", "mcp", "ldap", "db", "web", "login"]


def test_backup_all_on_a_machine_site_toml_does_not_name_exits_1_with_the_rule(tmp_path: Path) -> None:
    """As cron runs it here; kvm0 made remote, so that no host is this machine (unless this machine is kvm0/kvm1)."""
    here = Machine.here()
    site = (ROOT / "site.toml").read_text()
    remote = site.replace('\nuri = "qemu:///system"\n', '\nuri = "qemu+ssh://root@kvm0.example.net/system"\n')
    assert remote != site
    (tmp_path / "site.toml").write_text(remote)
    if this_machines_hosts(load_cluster(ROOT / "cluster.conf", tmp_path / "site.toml"), here):
        pytest.skip(f"this machine ({here.describe()}) is a host of the example site.toml")
    env = {**os.environ, "KVMCONF_CLUSTER": str(ROOT / "cluster.conf"), "KVMCONF_SITE": str(tmp_path / "site.toml")}
    env.pop("KVMCONF_LAB", None)
    result = subprocess.run([sys.executable, "-m", "invoke", "backup", "--all"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"kvmconf: backup --all: no host of {tmp_path}/site.toml is this machine"
                                    f" ({here.describe()}): {RULE}. Its hosts: kvm0 (uri qemu+ssh://root@kvm0")
