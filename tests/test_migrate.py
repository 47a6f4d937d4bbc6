"""Migration helpers that need no libvirt: where files go, and cluster.conf's host= edit (the lab tests the move)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf.connection import Connections
from kvmconf.errors import KvmconfError
from kvmconf.migrate import edit_host, files_to_copy, host_line, migrate, on_host


def test_files_go_to_the_target_hosts_disk_dir(example: Cluster) -> None:
    target, moved = on_host(example, example.vm("provision"), "kvm1")
    assert moved.host == "kvm1" and target.vm("provision").host == "kvm1"
    assert files_to_copy(example, example.vm("provision"), target, moved).files == (
        ("/var/lib/libvirt/images/provision.qcow2", "/var/lib/libvirt/images/provision.qcow2"),
        ("/var/lib/libvirt/images/provision-seed.iso", "/var/lib/libvirt/images/provision-seed.iso"))


@pytest.mark.parametrize(("name", "after"), [
    ("db", "host=kvm1 disk=raw after=ldap keep=4"),  # host= replaced in place
    ("login", "host=kvm1 net=dmz install=cloud after=ldap"),  # no host= (auto): added in front
])
def test_host_line_sets_host_and_keeps_everything_else(example: Cluster, name: str, after: str) -> None:
    old, new = host_line(Path("cluster.conf"), example.vm(name), "kvm1")
    assert old.split("\t")[:7] == new.split("\t")[:7]
    assert new.split("\t")[7] == after


def test_edit_host_rewrites_only_that_line(example: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "cluster.conf"
    shutil.copy("cluster.conf", path)
    shutil.copy("site.toml", tmp_path / "site.toml")
    before = path.read_text().split("\n")
    edit_host(path, example.vm("db"), "kvm1")
    after = path.read_text().split("\n")
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [example.vm("db").line - 1]
    assert load_cluster(path, tmp_path / "site.toml").vm("db").host == "kvm1"


def test_a_moved_line_is_not_edited_blindly(example: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "cluster.conf"
    path.write_text("\n" + Path("cluster.conf").read_text())  # every VM one line further down
    with pytest.raises(KvmconfError, match=f"{path}:7 is not db's line any more; set host=kvm1 there by hand"):
        host_line(path, example.vm("db"), "kvm1")


@pytest.mark.parametrize(("vm", "to", "message"), [
    ("nosuch", "kvm1", "'nosuch' is not a VM of cluster.conf"),
    ("db", "kvm9", "'kvm9' is not a host of site.toml (expected one of: kvm0, kvm1)"),
    ("db", "kvm0", "db: cluster.conf places it on kvm0 already"),
    ("compute1", "kvm0", "compute1: its disk is an LVM volume; cold migration copies disk files only"),
])
def test_refused_requests_touch_no_host(example: Cluster, vm: str, to: str, message: str) -> None:
    def no_libvirt(uri: str) -> None:
        raise AssertionError(f"opened {uri}")

    conns = Connections(example, opener=no_libvirt)
    with pytest.raises(KvmconfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        migrate(example, vm, to, conns)
