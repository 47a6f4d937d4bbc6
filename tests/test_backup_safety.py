"""What a backup run must not do quietly: write a NAS copy or a backup onto the wrong filesystem, stop every VM
for one VM's problem, end without a word in its log, read a clock gone backwards as a fresh backup, or back up
a VM of another host from here.

Real components: libvirt's client failing to connect (an unreachable host), a real SIGTERM, real manifests on
disk, tmpfs mounts (as root) for a NAS that is a filesystem of its own. Two stand-ins, said where used: a bug
(no real one to trigger) and the signal's timing (sent from the connection opener, while a VM is being done).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from generators.crontab import GRACE, max_interval
from generators.model import Cluster
from kvmconf.backup import cluster as cluster_module
from kvmconf.backup import engine, journal, report
from kvmconf.backup.cluster import RULE, Machine, backup, restore_vm
from kvmconf.backup.nas import NasFailed, stage
from kvmconf.backup.store import MANIFEST, DiskFile, Manifest, VmStore, checksum_file, write_point_files
from kvmconf.connection import connections, open_uri
from kvmconf.errors import KvmconfError
from tests.labs import quiet
from tests.tools import ROOT, mount_tmpfs, require_tool

KVM0 = Machine("kvm0", ("192.168.50.4",))
ALL_HOSTS = Machine("kvm1", ("192.168.50.4",))  # kvm1 by name, kvm0 by its address
LIMIT = max_interval("30 2 * * *") + GRACE
NOW = dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC)
# A libvirt that is not there: the real client fails to connect, as to a host that is down.
UNREACHABLE = "qemu:///system?socket=/nonexistent/libvirt-sock"


def local_point(root: Path, vm: str, time: str, data: bytes = b"backup", parent: Manifest | None = None) -> Manifest:
    """A complete point with a real file, its checksum and manifest, as the engine leaves it (incremental on
    `parent` when given; the file's content is what the test gives, not a qcow2 overlay)."""
    point_dir = VmStore(root, vm).point_dir(time)
    point_dir.mkdir(parents=True)
    (point_dir / "vda.qcow2").write_bytes(data)
    disk = DiskFile("vda", "/d/vm.qcow2", "qcow2", "vda.qcow2", 1 << 20, len(data),
                    checksum_file(point_dir / "vda.qcow2"), None if parent is None else f"../{parent.time}/vda.qcow2")
    manifest = Manifest(vm, time, "full" if parent is None else "incremental", time if parent is None else parent.chain,
                        None if parent is None else parent.time, f"kvmconf-{time}", False, [], [disk], 1.0)
    write_point_files(point_dir, manifest)
    return manifest


def with_backup_dir(cluster: Cluster, backup_dir: Path, **hosts: str) -> Cluster:
    """The cluster with its [backup] dir here and some hosts' URIs replaced."""
    site = dataclasses.replace(
        cluster.site, backup=dataclasses.replace(cluster.site.backup, dir=str(backup_dir), nas_dir=None),
        hosts={name: dataclasses.replace(h, uri=hosts.get(name, h.uri)) for name, h in cluster.site.hosts.items()})
    return dataclasses.replace(cluster, site=site)


# --- 1. an unmounted NAS share or backup disk ---

def test_a_missing_nas_dir_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    local_point(tmp_path / "local", "vm1", "20261120T023000Z")
    nas = tmp_path / "mnt" / "nas" / "kvmconf"
    with pytest.raises(NasFailed) as err:
        stage(VmStore(tmp_path / "local", "vm1"), VmStore(nas, "vm1"), 2, quiet)
    assert str(err.value) == (f"nas_dir {nas} does not exist: is the NAS share mounted? (kvmconf creates only the VM"
                              " directories below it)")
    assert not (tmp_path / "mnt").exists()


def test_a_nas_dir_on_the_backup_dirs_filesystem_is_an_unmounted_share(tmp_path: Path) -> None:
    local_point(tmp_path / "local", "vm1", "20261120T023000Z")
    nas = tmp_path / "nas"
    nas.mkdir()  # the mount point, with the share not mounted on it
    with pytest.raises(NasFailed) as err:
        stage(VmStore(tmp_path / "local", "vm1"), VmStore(nas, "vm1"), 2, quiet)
    assert str(err.value) == (f"nas_dir {nas} is on the same filesystem as the [backup] dir {tmp_path / 'local'}: the"
                              " NAS share is not mounted there (a copy would not be on the NAS)")
    assert list(nas.iterdir()) == []


def test_a_nas_dir_on_the_root_filesystem_is_an_unmounted_share_too(tmp_path: Path) -> None:
    """The [backup] dir on a disk of its own: the same-filesystem check alone let copies fill / (a reviewer's case)."""
    nas = Path(f"/kvmconf-test-nas-{os.getpid()}")  # the share's mount point on /, nothing mounted on it
    with mount_tmpfs(tmp_path / "local", "4m") as local:
        nas.mkdir()
        try:
            local_point(local, "vm1", "20261120T023000Z")
            with pytest.raises(NasFailed) as err:
                stage(VmStore(local, "vm1"), VmStore(nas, "vm1"), 2, quiet)
            assert str(err.value) == (f"nas_dir {nas} is on the root filesystem: the NAS share is not mounted there"
                                      " (a copy would fill / and not be on the NAS)")
            assert list(nas.iterdir()) == []
        finally:
            nas.rmdir()


@pytest.fixture
def nas_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs: a NAS share of its own filesystem, unmounted after."""
    with mount_tmpfs(tmp_path / "nas", "1m") as nas:
        yield nas


def test_a_mounted_nas_gets_the_vm_directory_and_a_verified_copy(tmp_path: Path, nas_fs: Path) -> None:
    made = local_point(tmp_path / "local", "vm1", "20261120T023000Z")
    lines: list[str] = []
    assert stage(VmStore(tmp_path / "local", "vm1"), VmStore(nas_fs, "vm1"), 2, lines.append) == [made.time]
    assert lines == ["vm1: NAS: copied and verified 20261120T023000Z"]
    assert [m.time for m in VmStore(nas_fs, "vm1").points()] == [made.time]


def test_a_retention_that_fails_is_named_and_the_new_point_still_reaches_the_nas(tmp_path: Path, nas_fs: Path) -> None:
    """A failed prune used to skip the NAS copy and be reported as "NAS: ...". A real failure: an immutable file in
    the expired chain (chattr +i, as root). No VM: the steps after the point touch it only for an in-place restore's
    replaced disks, and there are none."""
    old = local_point(tmp_path / "local", "vm1", "20261119T023000Z", b"old")
    new = local_point(tmp_path / "local", "vm1", "20261120T023000Z", b"new")
    store = VmStore(tmp_path / "local", "vm1")
    stuck = store.point_dir(old.time) / "vda.qcow2"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    outcome = engine.Outcome("vm1", ok=True, manifest=new)
    lines: list[str] = []
    try:
        engine._after_the_point(None, store, engine.Settings(store.dir.parent, 5, nas_fs), 1,  # type: ignore[arg-type]
                                outcome, lines.append)
    finally:
        for path in (stuck, store.dir / f"{old.time}.partial" / "vda.qcow2"):
            subprocess.run(["chattr", "-i", str(path)], check=False)
    assert (outcome.failed_step, outcome.error) == (
        "retention", f"{store.dir / (old.time + '.partial') / 'vda.qcow2'}: Operation not permitted")
    assert [m.time for m in VmStore(nas_fs, "vm1").points()] == [new.time]  # the NAS copy was still made
    assert "vm1: NAS: copied and verified 20261120T023000Z" in lines
    assert cluster_module.describe(outcome).endswith(f"\n  retention failed: {outcome.error}")


def test_a_read_only_nas_is_blamed_on_the_nas_not_the_local_directory(tmp_path: Path, nas_fs: Path) -> None:
    local_point(tmp_path / "local", "vm1", "20261120T023000Z")
    subprocess.run(["mount", "-o", "remount,ro", str(nas_fs)], check=True)
    with pytest.raises(NasFailed) as err:
        stage(VmStore(tmp_path / "local", "vm1"), VmStore(nas_fs, "vm1"), 2, quiet)
    assert str(err.value) == (f"vm1: the NAS copy in nas_dir {nas_fs} failed: {nas_fs}/vm1: Read-only file system")


def test_a_full_nas_is_a_nas_failure(tmp_path: Path, nas_fs: Path) -> None:
    local_point(tmp_path / "local", "vm1", "20261120T023000Z", os.urandom(2 << 20))  # 2 MiB on a 1 MiB NAS
    with pytest.raises(NasFailed) as err:
        stage(VmStore(tmp_path / "local", "vm1"), VmStore(nas_fs, "vm1"), 2, quiet)
    assert str(err.value).startswith("vm1: copying 20261120T023000Z to the NAS failed: cp: "), err.value
    assert str(err.value).endswith(": No space left on device"), err.value
    assert VmStore(nas_fs, "vm1").points() == [] and VmStore(nas_fs, "vm1").partials() == []


def test_a_point_damaged_here_is_named_and_the_other_chains_still_reach_the_nas(tmp_path: Path,
                                                                               nas_fs: Path) -> None:
    local = VmStore(tmp_path / "local", "vm1")
    full = local_point(local.root, "vm1", "20261118T023000Z", b"full")
    local_point(local.root, "vm1", "20261119T023000Z", b"incremental", parent=full)
    newer = local_point(local.root, "vm1", "20261120T023000Z", b"the next chain")
    (local.point_dir(full.time) / "vda.qcow2").write_bytes(b"rot!")  # bit rot on the local disk
    lines: list[str] = []
    with pytest.raises(NasFailed) as err:
        stage(local, VmStore(nas_fs, "vm1"), 2, lines.append)
    assert str(err.value) == (f"vm1: restore point {full.time} is damaged here (checksum mismatch: vda.qcow2 in"
                              f" {local.point_dir(full.time)}): not copied to the NAS (nor the points built on it:"
                              " 20261119T023000Z)")
    assert lines == [f"vm1: NAS: copied and verified {newer.time}"]  # the damaged chain does not hold it back
    assert [m.time for m in VmStore(nas_fs, "vm1").points()] == [newer.time]
    assert VmStore(nas_fs, "vm1").partials() == []


def test_a_nas_copy_that_does_not_verify_is_blamed_on_the_nas(tmp_path: Path, nas_fs: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a NAS that damages what it stores (the copy function flips a byte after cp wrote it)."""
    from kvmconf.backup import nas

    local = VmStore(tmp_path / "local", "vm1")
    made = local_point(local.root, "vm1", "20261120T023000Z", b"backup")
    real_copy = nas._copy_file

    def damaging_nas(source: Path, target: Path) -> str:
        failure = real_copy(source, target)
        target.write_bytes(b"X" + target.read_bytes()[1:])
        return failure

    monkeypatch.setattr(nas, "_copy_file", damaging_nas)
    with pytest.raises(NasFailed) as err:
        stage(local, VmStore(nas_fs, "vm1"), 2, quiet)
    assert str(err.value) == (f"vm1: the NAS copy of {made.time} does not verify (checksum mismatch: vda.qcow2; the"
                              " local files do)")
    assert VmStore(nas_fs, "vm1").points() == [] and VmStore(nas_fs, "vm1").partials() == []
    assert local.verify(made) == []


def test_the_nas_copy_is_read_back_from_the_nas_not_this_hosts_cache(tmp_path: Path) -> None:
    """After the flush the copy's pages leave the page cache (fincore counts them), so its checksum is the NAS's.

    On a real filesystem (the test's, ext4): a tmpfs NAS would keep its pages, they are its storage.
    """
    from kvmconf.backup.nas import _flush_and_uncache

    copy = tmp_path / "vda.qcow2"
    copy.write_bytes(os.urandom(1 << 20))

    def cached() -> int:
        out = subprocess.run([require_tool("fincore"), "--bytes", "--noheadings", "--output", "RES", str(copy)],
                             capture_output=True, text=True, check=True).stdout
        return int(out)

    assert cached() == 1 << 20
    _flush_and_uncache(copy)
    assert cached() == 0


def test_status_counts_no_nas_copies_while_the_share_is_not_mounted(tmp_path: Path, nas_fs: Path) -> None:
    local_point(tmp_path / "local", "vm1", "20261120T023000Z")
    local_point(tmp_path / "unmounted", "vm1", "20261120T023000Z")  # left on / by a run before this check
    assert report.vm_status(tmp_path / "local", tmp_path / "unmounted", "vm1", NOW).nas_points == 0
    stage(VmStore(tmp_path / "local", "vm1"), VmStore(nas_fs, "vm1"), 2, quiet)
    assert report.vm_status(tmp_path / "local", nas_fs, "vm1", NOW).nas_points == 1


def test_the_lock_never_creates_a_missing_backup_dir(tmp_path: Path) -> None:
    with pytest.raises(KvmconfError) as err, journal.vm_lock(tmp_path / "backups" / "vm1"):
        pass
    assert str(err.value) == (f"vm1: the [backup] dir {tmp_path}/backups does not exist (is its filesystem mounted?):"
                              " `fab kvm-setup` creates it")
    assert not (tmp_path / "backups").exists()
    (tmp_path / "backups").mkdir()
    with journal.vm_lock(tmp_path / "backups" / "vm1"):
        assert (tmp_path / "backups" / "vm1" / journal.LOCK).is_file()


# --- 2. a point from the future ---

def test_a_point_in_the_future_is_critical_not_a_negative_age(tmp_path: Path) -> None:
    local_point(tmp_path, "vm1", "20361120T023000Z")  # a clock that ran ten years ahead when it was made
    row = report.vm_status(tmp_path, None, "vm1", NOW)
    assert report.nagios([row], LIMIT) == (2, "BACKUP CRITICAL - vm1: last good 20361120T023000Z, newest point is"
                                              " in the future: check the clock (limit 26.0 h)")
    assert report.format_table([row], LIMIT).splitlines()[1].endswith("  newest point is in the future: check the"
                                                                      " clock")
    local_point(tmp_path, "vm2", "20261121T030030Z")  # 30 s ahead: clocks of a few seconds apart are no problem
    assert report.nagios([report.vm_status(tmp_path, None, "vm2", NOW)], LIMIT) == (0, "BACKUP OK - vm2 -0.0 h")


# --- 3. one VM's problem is that VM's, and the run is recorded ---

def test_a_manifest_that_does_not_parse_names_its_file_and_is_that_vms_problem(tmp_path: Path) -> None:
    local_point(tmp_path, "vm1", "20261120T023000Z")
    manifest = VmStore(tmp_path, "vm1").point_dir("20261120T023000Z") / MANIFEST
    manifest.write_text(manifest.read_text()[:40])  # truncated by a crash of a filesystem without journal
    expected = (f"{manifest}: the restore point's manifest does not parse (JSONDecodeError: Unterminated string"
                f" starting at: line 3 column 12 (char 30)): rename {manifest.parent} to {manifest.parent}.damaged"
                " (any name that is not a point's time) to go on; the points built on it then cannot be restored")
    with pytest.raises(KvmconfError) as err:
        VmStore(tmp_path, "vm1").points()
    assert str(err.value) == expected
    local_point(tmp_path, "vm2", "20261120T023000Z")
    rows = [report.vm_status(tmp_path, None, vm, NOW) for vm in ("vm1", "vm2")]
    assert report.nagios(rows, LIMIT) == (2, f"BACKUP CRITICAL - vm1: {expected} (limit 26.0 h)")
    table = report.format_table(rows, LIMIT).splitlines()
    assert table[1].endswith(f"  {expected}") and table[2].startswith("vm2              20261120T023000Z")


def test_a_last_run_record_that_does_not_parse_is_a_warning_naming_it(tmp_path: Path) -> None:
    local_point(tmp_path, "vm1", "20261120T023000Z")
    (tmp_path / "vm1" / journal.LAST_RUN).write_text('{"error": "", "ok": tr')
    row = report.vm_status(tmp_path, None, "vm1", NOW)
    assert report.nagios([row], LIMIT) == (1, f"BACKUP WARNING - vm1: last run failed ({tmp_path}/vm1/last-run.json"
                                              " does not parse (Expecting value: line 1 column 21 (char 20)): the"
                                              " next run replaces it)")


def test_an_unreachable_host_fails_its_vms_and_the_run_goes_on_recorded(example: Cluster, tmp_path: Path) -> None:
    cluster = with_backup_dir(example, tmp_path, kvm0=UNREACHABLE)
    (tmp_path / "db").mkdir()  # backed up before: its last run is recorded for backup-status
    lines: list[str] = []
    with connections(cluster) as conns:
        outcomes = backup(cluster, [], True, conns, False, lines.append, KVM0)
    vms = ["provision", "mcp", "ldap", "db", "web", "login"]
    assert [o.vm for o in outcomes] == vms and not any(o.ok for o in outcomes)  # every VM tried, none skipped
    error = outcomes[0].error
    assert error.startswith(f"host 'kvm0': cannot connect to libvirt at {UNREACHABLE} (")
    assert re.fullmatch(rf"backup: started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, pid {os.getpid()}: "
                        + ", ".join(vms), lines[0]), lines[0]
    assert lines[1:-1] == [f"{vm}: BACKUP FAILED: {error}" for vm in vms]
    assert lines[-1].startswith("backup: finished ") and lines[-1].endswith(f" UTC: 0 ok, failed: {', '.join(vms)}")
    last_run = journal.read(tmp_path / "db", journal.LAST_RUN)
    assert last_run is not None and (last_run["ok"], last_run["error"]) == (False, error)
    never_backed_up = journal.read(tmp_path / "web", journal.LAST_RUN)  # its directory made for the record
    assert never_backed_up is not None and (never_backed_up["ok"], never_backed_up["error"]) == (False, error)
    assert report.vm_status(tmp_path, None, "web", NOW).last_error.endswith(f": {error}")  # not "no backup yet"


def test_a_vm_not_defined_on_its_host_is_a_recorded_failure(example: Cluster, tmp_path: Path) -> None:
    """libvirt's test driver (test:///default) as the host: a real connection on which db is not defined."""
    cluster = with_backup_dir(example, tmp_path, kvm0="test:///default")
    with connections(cluster) as conns:
        [outcome] = backup(cluster, ["db"], False, conns, False, quiet, KVM0)
    assert (outcome.ok, outcome.error) == (False, "not defined on kvm0")
    last_run = journal.read(tmp_path / "db", journal.LAST_RUN)
    assert last_run is not None and (last_run["ok"], last_run["error"]) == (False, "not defined on kvm0")


def test_a_failure_with_no_backup_dir_is_not_recorded_in_a_new_one(example: Cluster, tmp_path: Path) -> None:
    cluster = with_backup_dir(example, tmp_path / "not-mounted", kvm0=UNREACHABLE)
    with connections(cluster) as conns:
        [outcome] = backup(cluster, ["db"], False, conns, False, quiet, KVM0)
    assert not outcome.ok and not (tmp_path / "not-mounted").exists()  # backup-status says the dir is missing


def test_a_vm_named_twice_is_backed_up_once(example: Cluster, tmp_path: Path) -> None:
    cluster = with_backup_dir(example, tmp_path, kvm0=UNREACHABLE)
    lines: list[str] = []
    with connections(cluster) as conns:
        outcomes = backup(cluster, ["db", "web", "db"], False, conns, False, lines.append, KVM0)
    assert [o.vm for o in outcomes] == ["db", "web"]
    assert lines[0].endswith(f"pid {os.getpid()}: db, web"), lines[0]


def test_a_bug_in_one_vms_backup_is_its_failure_and_the_next_vm_is_still_tried(
        example: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stand-in for a bug: the opener raises for kvm0 (no real bug to trigger); kvm1's VM is still tried."""
    cluster = with_backup_dir(example, tmp_path, kvm1=UNREACHABLE)
    (tmp_path / "db").mkdir()

    def buggy_for_kvm0(uri: str) -> libvirt.virConnect:
        if uri == example.site.hosts["kvm0"].uri:
            raise TypeError("'NoneType' object is not subscriptable")
        return open_uri(uri)

    lines: list[str] = []
    with connections(cluster, buggy_for_kvm0) as conns:
        outcomes = backup(cluster, ["db", "compute1"], False, conns, False, lines.append, ALL_HOSTS)
    bug = ("unexpected error TypeError: 'NoneType' object is not subscriptable (a bug: its traceback is on stderr,"
           " in the cron log)")
    assert (outcomes[0].vm, outcomes[0].ok, outcomes[0].error) == ("db", False, bug)
    assert outcomes[1].vm == "compute1" and outcomes[1].error.startswith("host 'kvm1': cannot connect to libvirt")
    assert lines[1] == f"db: BACKUP FAILED: {bug}"
    assert capsys.readouterr().err.startswith("Traceback (most recent call last):")
    last_run = journal.read(tmp_path / "db", journal.LAST_RUN)
    assert last_run is not None and last_run["error"] == bug


def test_sigterm_during_a_vm_records_it_as_interrupted_and_says_so(example: Cluster, tmp_path: Path) -> None:
    """A real SIGTERM, sent while the run connects for its second VM (the opener sends it: the timing)."""
    cluster = with_backup_dir(example, tmp_path, kvm0=UNREACHABLE, kvm1=UNREACHABLE + "1")
    (tmp_path / "compute1").mkdir()

    def terminated_while_connecting(uri: str) -> libvirt.virConnect:
        if uri.endswith("1"):
            os.kill(os.getpid(), signal.SIGTERM)
        return open_uri(uri)

    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt), connections(cluster, terminated_while_connecting) as conns:
        backup(cluster, ["db", "compute1", "web"], False, conns, False, lines.append, ALL_HOSTS)
    assert lines[1].startswith("db: BACKUP FAILED: host 'kvm0': cannot connect")
    assert re.fullmatch(r"backup: interrupted \S+ \S+ UTC \(Ctrl-C or SIGTERM\); finished before it: db", lines[2])
    assert len(lines) == 3  # web not tried
    last_run = journal.read(tmp_path / "compute1", journal.LAST_RUN)
    assert last_run is not None and (last_run["ok"], last_run["error"]) == (
        False, "interrupted (Ctrl-C or SIGTERM) before it finished")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is given back


# --- 6. the VMs of another host are backed up and restored in place there ---

def test_backup_or_in_place_restore_of_another_hosts_vm_names_the_host_to_run_it_on(example: Cluster,
                                                                                     tmp_path: Path) -> None:
    cluster = with_backup_dir(example, tmp_path)
    expected = ("{task} compute1: its host kvm1 is not this machine (hostname kvm0, addresses 192.168.50.4;"
                f" {RULE}): run it on kvm1")
    with connections(cluster) as conns:
        with pytest.raises(KvmconfError) as err:
            backup(cluster, ["db", "compute1"], False, conns, False, quiet, KVM0)
        assert str(err.value) == expected.format(task="backup")
        with pytest.raises(KvmconfError) as err:
            restore_vm(cluster, "compute1", None, None, True, conns, quiet, KVM0)
        assert str(err.value) == expected.format(task="restore")
        assert conns._open == {}  # refused before connecting to either host
    assert list(tmp_path.iterdir()) == []


# --- 3 and 4, as cron and Nagios run the tasks ---

def _invoke(tmp_path: Path, site_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The task in a process of its own, stdout and stderr into one pipe as cron's `>> log 2>&1` has them."""
    (tmp_path / "site.toml").write_text(site_text)
    env = {**os.environ, "KVMCONF_CLUSTER": str(ROOT / "cluster.conf"), "KVMCONF_SITE": str(tmp_path / "site.toml")}
    env.pop("KVMCONF_LAB", None)
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def test_the_log_has_a_first_and_last_line_and_the_failure_after_the_vms_lines(tmp_path: Path) -> None:
    site = (ROOT / "site.toml").read_text()
    unreachable = site.replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}"').replace(
        '\nuri = "qemu:///system"\n', f'\nuri = "{UNREACHABLE}"\n')
    assert unreachable.count(UNREACHABLE) == 1 and str(tmp_path) in unreachable
    result = _invoke(tmp_path, unreachable, "backup", "--vm", "db")
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and len(lines) == 4, result.stdout
    assert re.fullmatch(r"backup: started \S+ \S+ UTC, pid \d+: db", lines[0]), lines[0]
    assert lines[1].startswith(f"db: BACKUP FAILED: host 'kvm0': cannot connect to libvirt at {UNREACHABLE} (")
    assert re.fullmatch(r"backup: finished \S+ \S+ UTC: 0 ok, failed: db", lines[2]), lines[2]
    assert lines[3] == "kvmconf: backup failed for db"  # stderr, after what it sums up


def test_nagios_is_told_unknown_when_the_check_itself_fails(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "[backup\n", "backup-status", "--nagios")
    assert (result.returncode, result.stdout) == (3, f"BACKUP UNKNOWN - backup-status failed: ConfigError:"
                                                     f" {tmp_path}/site.toml:1:8: not valid TOML: Expected ']' at the"
                                                     " end of a table declaration\n")  # no traceback: not a bug
