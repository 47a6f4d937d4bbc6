"""Provisioning against the lab's real libvirtd daemons (one per host): what provision refuses to create a second
time, seed ISOs that changed reaching VMs that exist, and a VM whose line changed since it was provisioned moving
live.

The lab, its fixtures' cluster and the way tasks are run are test_lab's; this module starts a lab of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import libvirt
import pytest

from generators import cloud_init
from generators.model import Cluster
from generators.paths import seed_iso_path
from generators.validate import load_cluster
from kvmconf import lab
from kvmconf.disks import GIB
from tests import test_lab
from tests.labs import running_lab
from tests.test_lab import domains_on, invoke, lab_domain

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-pvtest-"  # + the pytest PID: a killed run's namespaces are removed by the next run


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)


# test_lab's fixtures, on this module's lab: its daemons emptied around each test, and editable copies of the fixtures.
clean = test_lab.clean
workdir = test_lab.workdir


def lab_cluster(workdir: Path, the_lab: lab.Lab) -> Cluster:
    """The cluster of ``workdir`` as the tasks see it with KVMCONF_LAB set."""
    return lab.remap(load_cluster(workdir / "cluster.conf", workdir / "site.toml"), the_lab)


def edit_vm_line(workdir: Path, name: str, column: int, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in one column of VM ``name``'s line of the workdir's cluster.conf."""
    path = workdir / "cluster.conf"
    lines = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == name:
            assert old in fields[column], (old, fields[column])
            fields[column] = fields[column].replace(old, new)
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n")


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_vm_defined_on_another_host_is_not_created_again(workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0
    edit_vm_line(workdir, "web", 7, "host=kvm0", "host=kvm1")  # as an admin's edit (or host=auto) would move it
    refusal = ("web: defined on kvm0 already, but cluster.conf places it on kvm1; it is not created a second time:"
               " to move it, set host=kvm0 for it in cluster.conf again and run `invoke migrate --vm web --to kvm1"
               " --edit`; to keep it there, set host=kvm0; or undefine it on kvm0 if that copy is unwanted")
    plan = invoke(workdir, clean, "plan")
    assert plan.returncode == 0, plan.stderr
    assert f"kvm1 ({clean.uri_of('kvm1')}):\n  ! {refusal}\n" in plan.stdout
    assert "  ? web  defined on this host, but cluster.conf places it on kvm1 (left alone)" in plan.stdout
    refused = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "db")
    # Stopped before anything, as a disk in the way stops a run: db (on kvm0, no problem of its own) is not made either.
    assert (refused.returncode, refused.stderr) == (1, f"kvmconf: {refusal}\nnothing was changed\n")
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert (files_in(clean.images / "kvm0"), files_in(clean.images / "kvm1")) == (["web.qcow2"], [])


def test_a_vm_whose_mac_a_domain_of_another_name_holds_is_not_created(workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0
    edit_vm_line(workdir, "web", 0, "web", "www")  # renamed in cluster.conf; its old domain still runs
    edit_vm_line(workdir, "www", 7, "host=kvm0", "host=kvm1")  # and on the other host: every host is looked at
    refusal = ("www: its MAC 52:54:00:50:00:21 belongs to domain 'web' defined on kvm0; it is not created beside it"
               " (two guests with one MAC and IP): if web is an old name of www, undefine it on kvm0 first, else give"
               " www another MAC")
    plan = invoke(workdir, clean, "plan", "--vm", "www")
    assert plan.returncode == 0, plan.stderr
    assert f"kvm1 ({clean.uri_of('kvm1')}):\n  ! {refusal}\n" in plan.stdout
    refused = invoke(workdir, clean, "provision", "--vm", "www", "--vm", "cloud")
    assert (refused.returncode, refused.stderr) == (1, f"kvmconf: {refusal}\nnothing was changed\n")
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert files_in(clean.images / "kvm1") == []


def qemu_seed_fds(name: str, seed: Path) -> list[str]:
    """What the QEMU processes of guest ``name`` have open of ``seed`` (the link's target, "(deleted)" if replaced)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"guest={name}".encode() in (proc / "cmdline").read_bytes():
                found += [t for t in (os.readlink(fd) for fd in (proc / "fd").iterdir()) if t.startswith(str(seed))]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended while we looked
    return found


def seed_open_by_qemu(name: str, seed: Path, expected: list[str]) -> list[str]:
    """:func:`qemu_seed_fds` once it is ``expected``, or after 10 s: a destroyed QEMU takes a moment to be gone."""
    deadline = time.monotonic() + 10
    while (found := qemu_seed_fds(name, seed)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_a_changed_seed_reaches_an_existing_vm_only_with_apply_and_at_its_next_cold_boot(
        workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "cloud").returncode == 0
    before = lab_cluster(workdir, clean)
    seed = Path(seed_iso_path(before, before.vm("cloud")) or "")
    old = seed.read_bytes()
    assert seed_open_by_qemu("cloud", seed, [str(seed)]) == [str(seed)]
    site = workdir / "site.toml"
    site.write_text(site.read_text().replace(" admin@lab\"]", " admin@lab-new-laptop\"]"))
    changed = lab_cluster(workdir, clean)
    new = cloud_init.render(changed)[PurePosixPath("cloud-init/cloud.iso")]
    assert new != old
    seed_line = (f"seed ISO {seed} differs from the generated one: replace it (applies at the next cold boot: the"
                 " running VM keeps the old one open until it is shut down and started)")

    plan = invoke(workdir, clean, "plan", "--vm", "cloud")
    assert plan.returncode == 0, plan.stderr
    assert f"  ~ cloud  change:\n      {seed_line}\n" in plan.stdout
    assert plan.stdout.endswith("0 to create, 1 to change, 0 unchanged\n")
    shown = invoke(workdir, clean, "provision", "--vm", "cloud")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == ("cloud: seed ISO differs from the generated one (not applied; run again with --apply):\n"
                            f"    {seed_line}\n0 created, 1 to change (shown, not applied), 0 unchanged\n")
    assert seed.read_bytes() == old

    inode = seed.stat().st_ino
    applied = invoke(workdir, clean, "provision", "--vm", "cloud", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == (f"cloud: wrote seed ISO {seed} (applies at the next cold boot: the running VM keeps the"
                              " old one open until it is shut down and started)\n0 created, 1 changed, 0 unchanged\n")
    assert seed.read_bytes() == new and seed.stat().st_ino != inode  # renamed over it, not rewritten in place
    assert files_in(seed.parent) == ["cloud-seed.iso", "cloud.qcow2"]  # no temporary left beside it
    replaced = [f"{seed} (deleted)"]  # the running guest still has the old one open
    assert seed_open_by_qemu("cloud", seed, replaced) == replaced
    assert "  = cloud  no change" in invoke(workdir, clean, "plan", "--vm", "cloud").stdout

    conn = libvirt.open(clean.uri_of("kvm1"))
    try:
        dom = conn.lookupByName("cloud")
        dom.destroy()
        dom.create()  # a cold boot: QEMU opens the seed ISO that is there now
    finally:
        conn.close()
    assert seed_open_by_qemu("cloud", seed, [str(seed)]) == [str(seed)]


def test_a_vm_libvirt_cannot_start_is_named_with_its_host_by_provision_and_start(workdir: Path, clean: lab.Lab) -> None:
    """libvirt's message ("Cannot get interface MTU on 'br60'") names neither: after web and db in one run, or with
    --all, the admin had to guess from the undo list which VM, on which host, failed."""
    site = workdir / "site.toml"  # a network whose bridge the lab's hosts do not have (it is not up on kvm0)
    site.write_text(site.read_text().replace("[hosts.kvm0]", '[networks.dmz]\nsubnet = "192.168.60.0/24"\ngateway ='
                                             ' "192.168.60.1"\nbridge = "br60"\n\n[hosts.kvm0]', 1))
    edit_vm_line(workdir, "db", 2, "192.168.50.20", "192.168.60.20")
    edit_vm_line(workdir, "db", 7, "install=none", "install=none net=dmz")
    failed = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "db")
    web, db = clean.images / "kvm0" / "web.qcow2", clean.images / "kvm0" / "db.img"
    assert (failed.returncode, failed.stderr) == (
        1, "kvmconf: provisioning failed: db on kvm0: libvirt failed: Cannot get interface MTU on 'br60': No such"
           f" device\nundone: db: defined on kvm0; db: created raw disk {db} (2 GB, thin); web: started; web: defined"
           f" on kvm0; web: created qcow2 disk {web} (1 GB, thin)\n")
    assert domains_on(clean) == [] and files_in(clean.images / "kvm0") == []
    assert invoke(workdir, clean, "provision", "--vm", "db", "--no-start").returncode == 0
    refused = invoke(workdir, clean, "start", "--vm", "db")
    assert (refused.returncode, refused.stderr) == (
        1, "kvmconf: db on kvm0: libvirt failed: Cannot get interface MTU on 'br60': No such device\n")


def test_a_live_migration_keeps_the_disk_size_the_vm_has_when_cluster_conf_says_another(
        workdir: Path, clean: lab.Lab) -> None:
    """A size raised in cluster.conf is never applied to a disk (provision says so): the target's disk was made at
    cluster.conf's size all the same, and libvirt refused to mirror into it ("Source and target image have
    different sizes"), so a running VM whose size had been raised could not move live."""
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0  # 1 GB, running
    edit_vm_line(workdir, "web", 4, "1", "3")
    moved = invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm1")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.splitlines()[:2] == ["web: migrating live to kvm1 (memory and disk) ...",
                                             "web: running on kvm1"]
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["web"])
    with lab_domain(clean, "kvm1", "web") as dom:
        assert dom.isActive() and dom.blockInfo("vda")[0] == GIB  # as it was: still not resized
