"""Which directory and namespace name a lab accepts, and that taking a lab down removes only what a lab makes.

Fast: no root, no daemons. The directory rules are checked on real directories; teardown runs on a lab whose
processes and namespace are gone (as after a crash), which is the part that deletes files.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from generators.model import Cluster
from kvmconf import lab
from kvmconf.errors import KvmconfError


@pytest.mark.parametrize("name", ["kvmconf-lab", "kvmconf-test-1234-updown", "lab_2", "a", "x" * 255, "n.1"])
def test_namespace_names_ip_takes_are_accepted(name: str) -> None:
    lab.check_netns_name(name)


@pytest.mark.parametrize("name", ["bad/name", "", ".", "..", "a b", "-x", ".hidden", "x" * 256, "tab\there"])
def test_a_namespace_name_ip_would_refuse_or_misread_is_refused_up_front(name: str) -> None:
    with pytest.raises(KvmconfError) as err:
        lab.check_netns_name(name)
    assert str(err.value) == (f"network namespace name {name!r}: use letters, digits, '_', '.' and '-' (not first),"
                              " at most 255 characters (`ip netns` refuses '/', '.' and '..'), e.g. kvmconf-lab")


def test_a_new_empty_or_lab_made_directory_is_accepted(tmp_path: Path) -> None:
    lab.check_lab_dir(tmp_path / "new")
    lab.check_lab_dir(tmp_path)  # empty
    (tmp_path / "base").mkdir()
    lab.check_lab_dir(tmp_path)  # what lab.down leaves: base/ with the admin's cloud images
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / lab.MARKER_FILE).write_text("")
    lab.check_lab_dir(tmp_path)  # marked as a lab's: what is not a lab's stays there (see the teardown test)
    (tmp_path / lab.MARKER_FILE).unlink()
    (tmp_path / lab.STATE_FILE).write_text("{}")
    lab.check_lab_dir(tmp_path)  # a lab started before there was a marker


def test_a_directory_of_other_files_is_refused_with_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "mydata").mkdir()
    (tmp_path / "precious.txt").write_text("important\n")
    with pytest.raises(KvmconfError) as err:
        lab.check_lab_dir(tmp_path)
    assert str(err.value) == (f"lab directory {tmp_path} holds mydata, precious.txt and no .kvmconf-lab (it is no"
                              " lab's): a lab starts only in a new or empty directory, or one a lab made; give --dir"
                              " (or KVMCONF_LAB) another one (default /var/tmp/kvmconf-lab)")
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text("")
    with pytest.raises(KvmconfError, match=r"holds a, b, c, \.\.\. and no \.kvmconf-lab"):
        lab.check_lab_dir(tmp_path)
    with pytest.raises(KvmconfError, match=r"^lab directory .*/precious.txt is not a directory: a lab starts only"):
        lab.check_lab_dir(tmp_path / "precious.txt")


def test_teardown_removes_what_a_lab_makes_and_nothing_else(tmp_path: Path) -> None:
    # Every entry a running two-host lab had (listed from one, `ls -A`), and the admin's files among them.
    made = [".kvmconf-lab", "dnsmasq.leases", "dnsmasq.log", "dnsmasq.pid", "http-server.log", "http.pid",
            "lab.json", "launch.log", "libvirtd.log", "libvirtd.pid", "reaper.pid", "virtlogd.log", "virtlogd.pid",
            "backup.log"]
    made_dirs = ["images/kvm0", "kvmconf", "tftp/pxelinux.cfg", "libvirt/etc", "sock", "backups/web",
                 "backups-nas/web"]
    host_made = ["launch.log", "libvirtd.log", "libvirtd.pid", "reaper.pid", "virtlogd.log", "virtlogd.pid"]
    for name in made:
        (tmp_path / name).write_text("x")
    for name in made_dirs:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "file").write_text("x")
    kvm1 = tmp_path / "hosts" / "kvm1"
    for name in ("libvirt/lib", "sock"):
        (kvm1 / name).mkdir(parents=True)
    for name in host_made:
        (kvm1 / name).write_text("x")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "bookworm.qcow2").write_text("the admin's cloud image")
    (tmp_path / "notes.txt").write_text("the admin's")
    (tmp_path / "mydata").mkdir()
    dead = lab.Lab(tmp_path, f"kvmconf-test-gone-{os.getpid()}", hosts=["kvm0", "kvm1"])
    assert not lab.netns_exists(dead.netns)

    lab.teardown(dead, lambda line: None)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "mydata", "notes.txt"]
    assert (tmp_path / "base" / "bookworm.qcow2").read_text() == "the admin's cloud image"
    assert (tmp_path / "notes.txt").read_text() == "the admin's"


def test_teardown_keeps_a_hosts_directory_holding_what_no_lab_made(tmp_path: Path) -> None:
    kvm1 = tmp_path / "hosts" / "kvm1"
    (kvm1 / "sock").mkdir(parents=True)
    (kvm1 / "keep.txt").write_text("mine")
    lab.teardown(lab.Lab(tmp_path, f"kvmconf-test-gone-{os.getpid()}", hosts=["kvm0", "kvm1"]), lambda line: None)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["hosts", "hosts/kvm1",
                                                                                 "hosts/kvm1/keep.txt"]


def test_the_labs_backups_stay_in_the_lab_directory(example: Cluster) -> None:
    """Lab VMs may bear real VMs' names: their backups must not join or prune the chains in the real [backup] dir."""
    assert example.site.backup.nas_dir == "/mnt/nas/kvmconf"
    the_lab = lab.Lab(Path("/var/tmp/lab"), "ns", hosts=["kvm0", "kvm1"])
    backup = lab.remap(example, the_lab).site.backup
    assert (backup.dir, backup.nas_dir, backup.log) == ("/var/tmp/lab/backups", "/var/tmp/lab/backups-nas",
                                                        "/var/tmp/lab/backup.log")
    real = example.site.backup
    assert (backup.schedule, backup.keep, backup.full_every) == (real.schedule, real.keep, real.full_every)
    no_nas = dataclasses.replace(example, site=dataclasses.replace(
        example.site, backup=dataclasses.replace(example.site.backup, nas_dir=None)))
    assert lab.remap(no_nas, the_lab).site.backup.nas_dir is None  # no NAS stage in site.toml: none in the lab
