"""Migration helpers that need no libvirt: where files go, and cluster.conf's host= edit (the lab tests the move)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import libvirt
import pytest

from generators.model import Cluster, DiskKind
from generators.validate import load_cluster
from kvmconf import domains
from kvmconf import migrate as migrate_module
from kvmconf import runner as runner_module
from kvmconf.connection import Connections, connections
from kvmconf.errors import KvmconfError, WrongUsage
from kvmconf.migrate import MigrationFailed, _remove_all, edit_host, files_to_copy, host_line, migrate, on_host
from kvmconf.plan import Artifacts
from kvmconf.runner import Result, Runner


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
    path.chmod(0o640)  # the admin's choice: kept
    before = path.read_text().split("\n")
    edit_host(path, example.vm("db"), "kvm1")
    after = path.read_text().split("\n")
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [example.vm("db").line - 1]
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.conf", "site.toml"]
    assert load_cluster(path, tmp_path / "site.toml").vm("db").host == "kvm1"


def test_edit_host_keeps_crlf_line_endings_and_a_bom(tmp_path: Path) -> None:
    """Editors on Windows save CRLF and a BOM, which cluster.conf accepts: --edit changes the host, no other byte."""
    shutil.copy("site.toml", tmp_path / "site.toml")
    path = tmp_path / "cluster.conf"
    lines = [line for line in Path("cluster.conf").read_text().splitlines() if line and not line.startswith("#")]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    cluster = load_cluster(path, tmp_path / "site.toml")
    first, db = cluster.vms[0], cluster.vm("db")
    assert first.line == 1
    edit_host(path, db, "kvm1")
    edit_host(path, first, "kvm1")
    text = path.read_bytes().decode()
    assert text.startswith("\ufeff" + first.name + "\t") and text.endswith("\r\n")
    after = text.removeprefix("\ufeff").split("\r\n")[:-1]
    assert "\n" not in "".join(after) and len(after) == len(lines)
    changed = [i for i, (a, b) in enumerate(zip(lines, after, strict=True)) if a != b]
    assert changed == [0, db.line - 1]
    for i in changed:  # the columns stay; only the options gain host=kvm1
        assert after[i].split("\t")[:7] == lines[i].split("\t")[:7] and "host=kvm1" in after[i].split("\t")[7]
    moved = load_cluster(path, tmp_path / "site.toml")
    assert moved.vm("db").host == "kvm1" and moved.vm(first.name).host == "kvm1"


def test_a_moved_line_is_not_edited_blindly(example: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "cluster.conf"
    path.write_text("\n" + Path("cluster.conf").read_text())  # every VM one line further down
    with pytest.raises(KvmconfError, match=f"{path}:7 is not db's line any more; set host=kvm1 there by hand"):
        host_line(path, example.vm("db"), "kvm1")


def _no_libvirt(uri: str) -> None:
    raise AssertionError(f"opened {uri}")


@pytest.mark.parametrize(("vm", "to", "message"), [
    ("nosuch", "kvm1", "'nosuch' is not a VM of cluster.conf"),
    ("db", "kvm9", "'kvm9' is not a host of site.toml (expected one of: kvm0, kvm1)"),
    ("compute1", "kvm0", "compute1: its disk is an LVM volume; migration copies and creates disk files only"),
    ("db", "", "name the host to move the VM to with --to HOST"),  # what the task passes without --to
])
def test_refused_requests_touch_no_host(example: Cluster, vm: str, to: str, message: str) -> None:
    conns = Connections(example, opener=_no_libvirt)
    with pytest.raises(KvmconfError, match=message.replace("(", r"\(").replace(")", r"\)")):
        migrate(example, vm, to, conns)


def _broken_libvirt(_uri: str) -> libvirt.virConnect:
    """A connection that opens, then fails its first call, as one whose daemon went away: a real libvirtError."""
    conn = libvirt.open("test:///default")
    conn.close()
    return conn


@pytest.mark.parametrize("opener", [_broken_libvirt, lambda _uri: libvirt.open("no-such-driver:///x")],
                         ids=["fails-listing", "fails-opening"])
def test_a_move_to_its_own_host_is_refused_in_short_when_libvirt_cannot_say_where_it_is_defined(
        example: Cluster, opener: Callable[[str], libvirt.virConnect]) -> None:
    """The hosts are asked only for a hint (where a migrate without --edit left it): their failure is not the
    refusal's."""
    with pytest.raises(KvmconfError) as refused:
        migrate(example, "db", "kvm0", Connections(example, opener=opener))
    assert str(refused.value) == "db: cluster.conf places it on kvm0 already"


@pytest.mark.parametrize(("site_edit", "line_edit", "problem"), [
    # kvm1 has 20000 MB: with db (8192 MB, line 7) there, compute1 (16384 MB, line 10) no longer fits.
    (("ram_mb = 65536", "ram_mb = 20000"), None,
     ":10:43: column 'ram': 16384 puts host 'kvm1' over capacity: its VMs up to this line need 24576 MB RAM"
     " (expected at most 20000 = 20000 × overcommit 1)"),
    # Pinned to CPUs 20-23, which kvm0 (32 CPUs) has and kvm1 (16) has not.
    (None, ("keep=4", "keep=4 cpuset=20-23"),
     ":7:108: column 'options': option 'cpuset': CPUs 20, 21, 22, 23 do not exist on host 'kvm1'"
     " (expected CPUs 0-15)"),
])
def test_a_move_the_target_host_cannot_take_is_refused_with_the_validation_problems(
        tmp_path: Path, site_edit: tuple[str, str] | None, line_edit: tuple[str, str] | None, problem: str) -> None:
    conf, site = tmp_path / "cluster.conf", tmp_path / "site.toml"
    text = Path("cluster.conf").read_text()
    conf.write_text(text.replace(*line_edit) if line_edit else text)
    site_text = Path("site.toml").read_text()
    site.write_text(site_text.replace(*site_edit) if site_edit else site_text)
    cluster = load_cluster(conf, site)  # valid as it is: only the move breaks it
    with pytest.raises(KvmconfError) as refused:
        migrate(cluster, "db", "kvm1", Connections(cluster, opener=_no_libvirt), force=True, cold=True)
    first, *problems = str(refused.value).split("\n")
    assert first == (f"db: kvm1 cannot take it: with host=kvm1 on line 7, {conf} would not validate;"
                     " nothing was changed:")
    assert problems == [f"{conf}{problem}"]
    assert conf.read_text() == (text.replace(*line_edit) if line_edit else text)


def test_a_backed_up_vm_is_not_moved_onto_a_host_the_nagios_backup_check_cannot_reach(tmp_path: Path) -> None:
    # kvm1 without address, its URI's host inside the cluster's domain, and no backed-up VM: valid until db moves there.
    conf, site = tmp_path / "cluster.conf", tmp_path / "site.toml"
    text = Path("cluster.conf").read_text().replace("cpuset=4-7 after=ldap", "cpuset=4-7 after=ldap backup=no")
    conf.write_text(text)
    site_text = Path("site.toml").read_text()
    site.write_text(site_text.replace('address = "192.168.50.5"', "#"))
    cluster = load_cluster(conf, site)
    with pytest.raises(KvmconfError) as refused:
        migrate(cluster, "db", "kvm1", Connections(cluster, opener=_no_libvirt), force=True, cold=True)
    assert str(refused.value).split("\n") == [
        f"db: kvm1 cannot take it: with host=kvm1 on line 7, {conf} would not validate; nothing was changed:",
        f"{site}:60:1: key 'hosts.kvm1.uri': host 'kvm1' needs an address the VMs can resolve: the Nagios backup check"
        " of its 1 backed-up VM (db) reaches the host over SSH at 'kvm1.phys.example.org' (its uri's host), and the"
        " VMs' only name server, the cluster's dnsmasq, answers phys.example.org only with cluster.conf's VMs and the"
        " hosts whose address is an IP"
        ' (expected address = "IP" of the host, or a DNS name outside phys.example.org, or backup=no on those VMs)']
    assert (conf.read_text(), site.read_text()) == (text, site_text.replace('address = "192.168.50.5"', "#"))


def test_force_without_cold_is_a_usage_error_not_ignored(example: Cluster) -> None:
    with pytest.raises(WrongUsage) as refused:
        migrate(example, "db", "kvm1", Connections(example, opener=_no_libvirt), force=True)
    assert str(refused.value) == ("--force powers a running VM off for a cold migration: give it together with"
                                  " --cold")


# --- the move itself, on two private instances of libvirt's test driver (two "hosts") ------------------

@pytest.fixture
def two_hosts(example: Cluster, tmp_path: Path) -> Cluster:
    """The example cluster with kvm0 and kvm1 as separate test-driver instances and disk dirs in tmp_path."""
    hosts = {}
    for name, host in example.site.hosts.items():
        (tmp_path / f"{name}.xml").write_text("<node/>\n")
        (tmp_path / name).mkdir()
        hosts[name] = dataclasses.replace(host, uri=f"test://{tmp_path}/{name}.xml", disk_dir=str(tmp_path / name))
    return dataclasses.replace(example, site=dataclasses.replace(example.site, hosts=hosts))


def _running_db(cluster: Cluster, conns: Connections) -> Path:
    vm = cluster.vm("db")
    disk = Path(cluster.site.hosts["kvm0"].disk_dir) / "db.img"
    with disk.open("wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 20)
        f.write(b"kvmconf data" * 1000)
    domains.start(domains.define(conns.get("kvm0"), Artifacts(cluster).domain_xml(vm)))
    return disk


def _cold_move_refused(two_hosts: Cluster, cluster: Cluster | None = None, data: bool = False) -> tuple[str, Path]:
    """A cold move of a running db to kvm1 (as ``cluster`` says, if given; with 20 MiB of data) that is refused before
    the VM is stopped: it still runs on kvm0 and nothing is defined on kvm1. Its message, and db's disk."""
    with connections(two_hosts) as conns:
        source = _running_db(two_hosts, conns)
        if data:
            _write_20_mib(source)
        with pytest.raises(KvmconfError) as refused:
            migrate(cluster or two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
        assert domains.is_active(conns.get("kvm0").lookupByName("db"))
        assert domains.lookup(conns.get("kvm1"), "db") is None
    return str(refused.value), source


def _write_20_mib(disk: Path) -> None:
    """More than one progress step (16 MiB) of data: the copy logs its progress once, as 16/20 MiB."""
    with disk.open("r+b") as f:
        f.seek(256 << 20)
        f.write(os.urandom(20 << 20))


@pytest.mark.slow  # copies hundreds of MiB through cp/tar: seconds each, left to `make test`
def test_cold_move_copies_the_disk_and_undefines_the_source_only_while_the_target_runs(
        two_hosts: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    with connections(two_hosts) as conns:
        source = _running_db(two_hosts, conns)
        real_undefine = domains.undefine

        def undefine(dom: libvirt.virDomain, keep_nvram: bool) -> None:
            target = domains.lookup(conns.get("kvm1"), "db")
            seen.append(target is not None and domains.is_active(target))
            real_undefine(dom, keep_nvram)

        monkeypatch.setattr(domains, "undefine", undefine)
        log: list[str] = []
        moved = migrate(two_hosts, "db", "kvm1", conns, force=True, log=log.append, cold=True)
        assert moved.host == "kvm1"
        assert seen == [True]  # the source went away only while the target ran
        assert domains.lookup(conns.get("kvm0"), "db") is None
        assert domains.is_active(conns.get("kvm1").lookupByName("db"))
    target = Path(two_hosts.site.hosts["kvm1"].disk_dir) / "db.img"
    assert target.read_bytes() == source.read_bytes()
    assert log[0] == "db: powered off on kvm0" and log[-1].startswith("db: undefined on kvm0; its files there")


def test_a_cold_move_says_the_changes_of_cluster_conf_it_applies_and_keeps_the_uuid(two_hosts: Cluster) -> None:
    """The target is defined as cluster.conf says: a RAM raised there without `provision --apply` took effect on the
    move without a word, and a UUID of the VM's own was replaced by the generated one."""
    own = "5a5a5a5a-1111-2222-3333-444444444444"
    bigger = dataclasses.replace(two_hosts, vms=tuple(dataclasses.replace(vm, ram_mb=16384) if vm.name == "db" else vm
                                                     for vm in two_hosts.vms))
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        dom = conns.get("kvm0").lookupByName("db")
        xml = domains.inactive_xml(dom)
        dom.destroy()
        dom.undefine()
        domains.start(conns.get("kvm0").defineXML(domains.with_uuid(xml, own)))  # as an admin defined it, running
        log: list[str] = []
        migrate(bigger, "db", "kvm1", conns, log=log.append, cold=True)
        moved = conns.get("kvm1").lookupByName("db")
        assert moved.UUIDString() == own and moved.maxMemory() == 16384 * 1024
    said = log[log.index("db: defined on kvm1 as cluster.conf says, which changes its definition (not applied on kvm0"
                         " yet: `invoke provision --apply` would have):"):]
    assert [line for line in said if line.startswith(("    -  <memory", "    +  <memory"))] == [
        '    -  <memory unit="KiB">8388608</memory>', '    +  <memory unit="KiB">16777216</memory>']
    assert said[-2:] == ["db: running on kvm1",
                         f"db: undefined on kvm0; its files there are kept: {_db_disk(two_hosts)}"]


def _db_disk(cluster: Cluster) -> Path:
    return Path(cluster.site.hosts["kvm0"].disk_dir) / "db.img"


def test_a_target_that_does_not_start_leaves_the_source_defined_and_nothing_on_the_target(
        two_hosts: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)

        def start(dom: libvirt.virDomain) -> bool:
            raise libvirt.libvirtError("no QEMU today")

        monkeypatch.setattr(domains, "start", start)
        with pytest.raises(MigrationFailed, match=r"db: migration to kvm1 failed: no QEMU today; the copies on kvm1"
                                                  r" were removed and the VM is still defined \(shut off\) on kvm0"):
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
        assert domains.lookup(conns.get("kvm0"), "db") is not None
        assert domains.lookup(conns.get("kvm1"), "db") is None
    assert list(Path(two_hosts.site.hosts["kvm1"].disk_dir).iterdir()) == []


def test_a_failed_live_migration_keeps_the_vm_running_on_the_source(two_hosts: Cluster) -> None:
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        # The test driver cannot migrate: a real refusal from libvirt.
        with pytest.raises(MigrationFailed, match=r"db: live migration to kvm1 failed: .*; it still runs on kvm0 and"
                                                  r" the files made on kvm1 were removed \(try --cold"):
            migrate(two_hosts, "db", "kvm1", conns, log=lambda _: None)
        assert domains.is_active(conns.get("kvm0").lookupByName("db"))
        assert domains.lookup(conns.get("kvm1"), "db") is None
    assert list(Path(two_hosts.site.hosts["kvm1"].disk_dir).iterdir()) == []


@pytest.mark.slow  # copies hundreds of MiB through cp/tar: seconds each, left to `make test`
def test_a_symlinked_disk_is_copied_as_the_file_it_names(two_hosts: Cluster, tmp_path: Path) -> None:
    """An admin who keeps the disk elsewhere and links it into disk_dir: the target gets the disk, thin, not a link
    (which would name the copy's temporary, gone once the copy is in place)."""
    elsewhere = tmp_path / "bigdisk/db.img"
    elsewhere.parent.mkdir()
    log: list[str] = []
    with connections(two_hosts) as conns:
        source = _running_db(two_hosts, conns)
        _write_20_mib(source)
        source.rename(elsewhere)
        source.symlink_to(elsewhere)
        migrate(two_hosts, "db", "kvm1", conns, force=True, log=log.append, cold=True)
        assert domains.is_active(conns.get("kvm1").lookupByName("db"))
    target = Path(two_hosts.site.hosts["kvm1"].disk_dir) / "db.img"
    assert not target.is_symlink() and target.read_bytes() == elsewhere.read_bytes()
    assert target.stat().st_blocks <= elsewhere.stat().st_blocks + 64, (target.stat().st_blocks,
                                                                         elsewhere.stat().st_blocks)
    # Out of the file's allocation (20 MiB), not the link's 0 bytes.
    assert log[1:3] == [f"db: copying {source}: 16/20 MiB ...", f"db: copied {source} to kvm1:{target}"]
    assert source.is_symlink()  # the source's files stay as they were


def test_an_interrupt_as_a_copy_lands_removes_it_and_goes_on(two_hosts: Cluster,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM, which the run turns into one) raised from inside the copy, once the file is in place.

    Deterministic stand-in for a signal; tests/test_migrate_interrupt.py sends a real one to a real run.
    """
    real_copy = migrate_module.copy_file

    def copy_then_interrupt(source: Runner, target: Runner, src: str, dst: str, placed: Callable[[str], None],
                            progress: migrate_module.Progress) -> None:
        real_copy(source, target, src, dst, placed, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(migrate_module, "copy_file", copy_then_interrupt)
    log: list[str] = []
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        with pytest.raises(KeyboardInterrupt):
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=log.append, cold=True)
        assert domains.lookup(conns.get("kvm0"), "db") is not None
        assert domains.lookup(conns.get("kvm1"), "db") is None
    assert log[-1] == ("db: migration to kvm1 interrupted; the copies on kvm1 were removed and the VM is still defined"
                       " (shut off) on kvm0: start it there with `invoke start`")
    assert list(Path(two_hosts.site.hosts["kvm1"].disk_dir).iterdir()) == []


def _appears_at(path: Path, content: bytes) -> Callable[[Sequence[str], bytes | None], Result]:
    """Runs commands for real, but another program writes ``path`` just before kvmconf links its file there."""
    def execute(argv: Sequence[str], stdin: bytes | None) -> Result:
        if argv[0] == "ln" and argv[-1] == str(path):
            path.write_bytes(content)
        return subprocess.run(list(argv), input=stdin, capture_output=True, check=False)
    return execute


@pytest.mark.parametrize("cold", [True, False])
def test_a_file_that_appears_on_the_target_after_the_check_is_neither_replaced_nor_removed(
        two_hosts: Cluster, cold: bool) -> None:
    """The check for files in the way comes first; another program may write the path before the copy lands.

    Cold, the copy is linked into place (a rename would replace that file); live, the empty disk is. The
    clean-up then removes only what this run made. The test driver cannot migrate live, but the disk is
    made before libvirt is asked.
    """
    theirs = Path(two_hosts.site.hosts["kvm1"].disk_dir) / "db.img"
    with connections(two_hosts, execute=_appears_at(theirs, b"someone else's")) as conns:
        _running_db(two_hosts, conns)
        with pytest.raises(MigrationFailed) as failed:
            migrate(two_hosts, "db", "kvm1", conns, force=cold, log=lambda _: None, cold=cold)
        assert domains.lookup(conns.get("kvm0"), "db") is not None
        assert domains.lookup(conns.get("kvm1"), "db") is None
    if cold:
        assert str(failed.value) == (
            f"db: migration to kvm1 failed: something else appeared at {theirs} during the copy; it is never"
            " overwritten and was left as it is; the copies on kvm1 were removed and the VM is still defined (shut"
            " off) on kvm0: start it there with `invoke start`")
    else:
        assert str(failed.value) == (
            f"db: live migration to kvm1 failed: db: its disk {theirs} already exists and is never overwritten;"
            " attach it as it is with --reuse-disk, or remove it with `invoke destroy --vm db --purge` if it is a"
            " leftover; it still runs on kvm0 and the files made on kvm1 were removed (try --cold: shut down, copy,"
            " start there)")
    assert [p.name for p in theirs.parent.iterdir()] == ["db.img"]  # no temporary either
    assert theirs.read_bytes() == b"someone else's"


def test_files_that_cannot_be_removed_are_named_for_removal_by_hand() -> None:
    def rm_fails(argv: Sequence[str], _stdin: bytes | None) -> Result:
        return subprocess.CompletedProcess(list(argv), 1, b"", b"rm: Read-only file system")

    message = _remove_all(Runner(execute=rm_fails), ["/images/db.img"])
    assert message == (" (BUT COULD NOT REMOVE, remove by hand: /images/db.img: localhost: `rm -f -- /images/db.img`"
                       " failed with exit status 1: rm: Read-only file system)")


@pytest.mark.parametrize(("source", "target"), [("kvm0", None), (None, "kvm1"), ("kvm0", "kvm1")],
                         ids=["from-ssh", "to-ssh", "ssh-to-ssh"])
def test_every_ssh_of_a_copy_gives_up_on_a_dropped_link(source: str | None, target: str | None) -> None:
    """The copy has no time limit, so each of its ssh sessions must end itself when the link drops (about a minute
    of unanswered keepalives), or a cold migration hangs forever with the VM shut down.

    The argv only: a dropped link would need packets dropped on an established connection (a firewall rule on
    loopback or in a namespace), and waiting out ssh's minute; the behaviour behind the options is ssh's own.
    """
    argvs = migrate_module._copy_pipeline(Runner(source), Runner(target), "/images/db.img",
                                          "/images/.db.img.x.kvmconf-migrating")
    keepalive = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    sshs = [argv for argv in argvs if argv[0] == "ssh"]
    assert len(sshs) == 1 and sshs[0][:7] == ["ssh", "-o", "BatchMode=yes", *keepalive]
    if source and target:  # the target's ssh runs on the source host, inside the command the first ssh runs there
        assert f"ssh -o BatchMode=yes {' '.join(keepalive)} kvm1 -- " in sshs[0][-1]


def _slow_tools(directory: Path, seconds: float, *tools: str) -> str:
    """A PATH with ``tools`` first on it as wrappers that wait ``seconds``, then run the real one."""
    directory.mkdir()
    for tool in tools:
        (directory / tool).write_text(f'#!/bin/sh\nsleep {seconds}\nexec {shutil.which(tool)} "$@"\n')
        (directory / tool).chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


@pytest.mark.slow  # copies hundreds of MiB through cp/tar: seconds each, left to `make test`
def test_a_copy_longer_than_the_command_time_limit_completes_and_shows_its_progress(
        two_hosts: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit on a host's quick commands (10 minutes) is scaled down to 1 s, and the copy made to take 2 s.

    Both cp and tar are slowed: whichever copies, a copy that ran under that limit would be stopped by it.
    """
    monkeypatch.setattr(runner_module, "_TIMEOUT", 1)
    monkeypatch.setenv("PATH", _slow_tools(tmp_path / "slow", 2, "cp", "tar"))
    log: list[str] = []
    with connections(two_hosts) as conns:
        source = _running_db(two_hosts, conns)
        _write_20_mib(source)
        migrate(two_hosts, "db", "kvm1", conns, force=True, log=log.append, cold=True)
        assert domains.is_active(conns.get("kvm1").lookupByName("db"))
    target = Path(two_hosts.site.hosts["kvm1"].disk_dir) / "db.img"
    assert log[:3] == ["db: powered off on kvm0", f"db: copying {source}: 16/20 MiB ...",
                       f"db: copied {source} to kvm1:{target}"]
    assert target.read_bytes() == source.read_bytes()


def test_a_hung_command_fails_the_migration_with_a_message_not_a_traceback(
        two_hosts: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ln` (the copy's last step) hangs past the limit: the run says where the VM is, as for any other failure."""
    monkeypatch.setattr(runner_module, "_TIMEOUT", 0.5)
    monkeypatch.setenv("PATH", _slow_tools(tmp_path / "slow", 30, "ln"))
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        with pytest.raises(MigrationFailed) as failed:
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
        assert domains.lookup(conns.get("kvm0"), "db") is not None
        assert domains.lookup(conns.get("kvm1"), "db") is None
    target = Path(two_hosts.site.hosts["kvm1"].disk_dir) / "db.img"
    assert re.fullmatch(rf"db: migration to kvm1 failed: `ln -T -- \S+\.kvmconf-migrating {re.escape(str(target))}` did"
                        r" not finish within 0\.5 s and was stopped \(a hung SSH session or host\?\); the copies on"
                        r" kvm1 were removed and the VM is still defined \(shut off\) on kvm0: start it there with"
                        r" `invoke start`", str(failed.value)), str(failed.value)
    assert list(target.parent.iterdir()) == []


def test_a_cold_move_without_the_base_image_on_the_target_is_refused_before_the_vm_is_stopped(
        two_hosts: Cluster, tmp_path: Path) -> None:
    """A copied install=cloud overlay names its base image: without it there, the VM would not start on the target.

    The base image is on the source host only (the lab's cloud_image path is not on this machine's /).
    """
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    source_dir = Path(two_hosts.site.hosts["kvm0"].disk_dir)
    cluster = dataclasses.replace(two_hosts, site=dataclasses.replace(two_hosts.site, oses={
        name: dataclasses.replace(os_, cloud_image=str(base)) for name, os_ in two_hosts.site.oses.items()}))
    vm = cluster.vm("provision")
    with connections(cluster) as conns:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                        str(source_dir / "provision.qcow2"), "20G"], check=True)
        (source_dir / "provision-seed.iso").write_bytes(b"seed")
        domains.start(domains.define(conns.get("kvm0"), Artifacts(cluster).domain_xml(vm)))
        base.rename(tmp_path / "elsewhere.qcow2")  # what the target host sees: no base image at that path
        with pytest.raises(KvmconfError) as refused:
            migrate(cluster, "provision", "kvm1", conns, force=True, log=lambda _: None, cold=True)
        assert domains.is_active(conns.get("kvm0").lookupByName("provision"))
        assert domains.lookup(conns.get("kvm1"), "provision") is None
    assert str(refused.value).startswith(
        f"provision: base image {base} for its install=cloud overlay is not usable on localhost (put the OS's cloud"
        f" image there, or fix cloud_image in site.toml): localhost: `qemu-img info {base}` failed with exit status 1:")
    assert str(refused.value).endswith("; nothing was changed")
    assert list(Path(cluster.site.hosts["kvm1"].disk_dir).iterdir()) == []


def test_a_failed_copy_names_the_commands_and_what_the_failing_one_said(
        two_hosts: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extracting tar fails (as on a full disk) and the sending one is stopped by it: the reader's failure is
    the one reported, with its words."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "tar").write_text(f'#!/bin/sh\nif [ "$1" = --extract ]; then echo "tar: {tmp_path}/kvm1: Cannot write:'
                              f' No space left on device" >&2; exit 2; fi\nexec {shutil.which("tar")} "$@"\n')
    (fake / "tar").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with connections(two_hosts) as conns:
        source = _running_db(two_hosts, conns)
        with pytest.raises(MigrationFailed) as failed:
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
        assert domains.lookup(conns.get("kvm0"), "db") is not None
    target_dir = Path(two_hosts.site.hosts["kvm1"].disk_dir)
    assert re.fullmatch(
        rf"db: migration to kvm1 failed: localhost: `tar --create --sparse .* -- db\.img \| tar --extract .*"
        rf" --directory={re.escape(str(target_dir))} --no-same-owner` failed with exit status 2: tar:"
        rf" {re.escape(str(target_dir))}: Cannot write: No space left on device; the copies on kvm1 were removed"
        r" and the VM is still defined \(shut off\) on kvm0: start it there with `invoke start`", str(failed.value)
    ), str(failed.value)
    assert source.exists() and list(target_dir.iterdir()) == []


def test_a_vm_whose_disk_changed_in_cluster_conf_is_not_stopped_for_a_copy_that_cannot_be_made(
        two_hosts: Cluster) -> None:
    """db runs on its raw db.img; cluster.conf now says disk=qcow2 (not applied: provision never replaces a disk).
    A cold move powered the VM off, then failed to find db.qcow2 and left it shut off; it is refused up front."""
    changed = dataclasses.replace(two_hosts, vms=tuple(
        dataclasses.replace(vm, disk=dataclasses.replace(vm.disk, kind=DiskKind.QCOW2)) if vm.name == "db" else vm
        for vm in two_hosts.vms))
    refused, _ = _cold_move_refused(two_hosts, changed)
    kvm0 = two_hosts.site.hosts["kvm0"].disk_dir
    assert refused == (
        f"db: its domain on kvm0 has disks that cluster.conf does not give it: {kvm0}/db.img; a migration moves only"
        f" {kvm0}/db.qcow2, so it would start on kvm1 without them (cold) or mirror them into whatever is at that"
        " path there (live); nothing was changed (make cluster.conf say the disk the VM has, or detach the others)")
    assert list(Path(two_hosts.site.hosts["kvm1"].disk_dir).iterdir()) == []


def test_a_target_without_its_disk_dir_is_refused_before_the_vm_is_stopped(two_hosts: Cluster) -> None:
    """The cold move powered the VM off, then its copy failed on the missing directory: down for nothing."""
    kvm1 = Path(two_hosts.site.hosts["kvm1"].disk_dir)
    kvm1.rmdir()
    refused, _ = _cold_move_refused(two_hosts)
    assert refused == (f"db: the directory {kvm1} for its disk is not on kvm1; create it there (`fab"
                                  f" kvm-setup` does), or fix disk_dir of [hosts.kvm1] in {two_hosts.site.path};"
                                  " nothing was changed")
    assert not kvm1.exists()


@pytest.fixture
def small_kvm1(two_hosts: Cluster) -> Iterator[Path]:
    """kvm1's disk_dir on a filesystem of its own with 8 MiB: a real full disk (a tmpfs; needs root)."""
    kvm1 = Path(two_hosts.site.hosts["kvm1"].disk_dir)
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "kvmconf-test", str(kvm1)], check=True)
    try:
        yield kvm1
    finally:
        subprocess.run(["umount", str(kvm1)], check=True)


def test_a_target_without_room_for_the_disk_is_refused_before_the_vm_is_stopped(
        two_hosts: Cluster, small_kvm1: Path) -> None:
    """The cold move powered the VM off, then its copy failed when the target's filesystem filled up."""
    refused, source = _cold_move_refused(two_hosts, data=True)
    assert refused == (f"db: {small_kvm1} on kvm1 has 8 MiB free, and its files take 20 MiB on kvm0"
                                  f" ({source}); nothing was changed: make room there first")
    assert list(small_kvm1.iterdir()) == []


def _left_on_kvm0(cluster: Cluster) -> str:
    return ("it is still defined (shut off) on kvm0, where its disk is now out of date: never start it there; undefine"
            f" it with `virsh -c {cluster.site.hosts['kvm0'].uri} undefine db --nvram --checkpoints-metadata"
            " --snapshots-metadata` (its files there stay)")


def test_a_source_that_cannot_be_undefined_says_the_vm_runs_on_the_target_and_what_to_do(
        two_hosts: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step fails (mocked: a source host that stops answering just then cannot be arranged here). libvirt's
    bare error was all the admin saw, with the VM defined on both hosts."""
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        real_undefine = domains.undefine

        def undefine(dom: libvirt.virDomain, keep_nvram: bool) -> None:
            if dom.connect().getURI() == conns.uri("kvm0"):
                raise libvirt.libvirtError("Cannot recv data: Connection reset by peer")
            real_undefine(dom, keep_nvram)

        monkeypatch.setattr(domains, "undefine", undefine)
        with pytest.raises(MigrationFailed) as failed:
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
        assert domains.is_active(conns.get("kvm1").lookupByName("db"))
        source = conns.get("kvm0").lookupByName("db")
        assert not domains.is_active(source) and not source.autostart()
    assert str(failed.value) == ("db: moved to kvm1, but its last step failed: Cannot recv data: Connection reset by"
                                 f" peer; it runs on kvm1, and {_left_on_kvm0(two_hosts)}")


def test_an_interrupt_at_the_last_step_says_where_the_vm_is_and_a_second_run_does_not_say_remove_it(
        two_hosts: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Ctrl-C (SIGINT) just as the source is to be undefined: the run ended on "interrupted" alone, and the
    next run told the admin to remove the domain on the target, the one that runs, with the only current disk."""
    log: list[str] = []
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        real_undefine = domains.undefine

        def undefine(dom: libvirt.virDomain, keep_nvram: bool) -> None:
            if dom.connect().getURI() == conns.uri("kvm0"):
                os.kill(os.getpid(), signal.SIGINT)
            real_undefine(dom, keep_nvram)

        monkeypatch.setattr(domains, "undefine", undefine)
        with pytest.raises(KeyboardInterrupt):
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=log.append, cold=True)
        monkeypatch.undo()
        assert domains.is_active(conns.get("kvm1").lookupByName("db"))
        assert not domains.is_active(conns.get("kvm0").lookupByName("db"))
        assert log[-1] == ("db: migration to kvm1 interrupted at its last step; it runs on kvm1, and"
                           f" {_left_on_kvm0(two_hosts)}")
        with pytest.raises(KvmconfError) as refused:
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
    assert str(refused.value) == f"db: it runs on kvm1 already; {_left_on_kvm0(two_hosts)}"


def test_a_second_run_after_a_move_that_did_not_finish_does_not_say_remove_the_vm_that_runs(
        two_hosts: Cluster) -> None:
    """db runs on kvm1 and is still defined, shut off, on kvm0 (the state above, made directly)."""
    with connections(two_hosts) as conns:
        _running_db(two_hosts, conns)
        conns.get("kvm0").lookupByName("db").destroy()
        target, moved = on_host(two_hosts, two_hosts.vm("db"), "kvm1")
        domains.start(domains.define(conns.get("kvm1"), Artifacts(target).domain_xml(moved)))
        with pytest.raises(KvmconfError) as refused:
            migrate(two_hosts, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
    assert str(refused.value) == f"db: it runs on kvm1 already; {_left_on_kvm0(two_hosts)}"
