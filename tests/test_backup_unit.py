"""The backup's pure parts: chain retention, the libvirt XML it sends, the schedule limit, status and Nagios."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generators.crontab import GRACE, field_values, max_interval
from generators.model import Cluster
from kvmconf.backup import journal, report
from kvmconf.backup.libvirt_xml import VmDisk, backup_xml, checkpoint_xml, domain_disks, has_guest_agent
from kvmconf.backup.store import DiskFile, Manifest, VmStore, expired_chains, write_point_files


def point(time: str, chain: str, parent: str | None = None) -> Manifest:
    return Manifest("vm", time, "full" if parent is None else "incremental", chain, parent, f"kvmconf-{time}", False,
                    [], [DiskFile("vda", "/d/vm.qcow2", "qcow2", "vda.qcow2", 1 << 30, 1 << 20, "xxh128:" + "0" * 32,
                                  None)], 1.0)


def test_retention_deletes_whole_chains_only() -> None:
    points = [point("1", "1"), point("2", "1", "1"), point("3", "3"), point("4", "3", "3"), point("5", "5")]
    assert expired_chains(points, 2) == ["1"]  # 4 and 5 are kept; 4 needs its base 3
    assert expired_chains(points, 1) == ["1", "3"]
    assert expired_chains(points, 3) == ["1"]
    assert expired_chains(points, 4) == []  # point 2 is among the newest 4: its chain (and base 1) stays
    assert expired_chains(points[:2], 1) == []  # never the chain of the newest point


def test_store_lists_only_complete_points_and_follows_chains(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "vm")
    for m in (point("20260101T000000Z", "20260101T000000Z"),
              point("20260102T000000Z", "20260101T000000Z", "20260101T000000Z")):
        store.point_dir(m.time).mkdir(parents=True)
        write_point_files(store.point_dir(m.time), m)
    (store.dir / "20260103T000000Z.partial").mkdir()
    (store.dir / "20260104T000000Z").mkdir()  # no manifest: not a point
    assert [m.time for m in store.points()] == ["20260101T000000Z", "20260102T000000Z"]
    assert [m.time for m in store.chain_of(store.points()[-1])] == ["20260101T000000Z", "20260102T000000Z"]
    assert store.verify(store.points()[0]) == [f"{store.dir}/20260101T000000Z/vda.qcow2: missing"]
    assert (store.point_dir("20260101T000000Z") / "XXH128SUMS").read_text() == f"{'0' * 32}  vda.qcow2\n"


def test_points_written_with_blake3_still_load_and_verify(tmp_path: Path) -> None:
    """Before 2026-11-22 manifests recorded a bare BLAKE3 digest under "blake3", and the point had B3SUMS."""
    store = VmStore(tmp_path, "vm")
    point_dir = store.point_dir("20260101T000000Z")
    point_dir.mkdir(parents=True)
    (point_dir / "vda.qcow2").write_bytes(b"backup")
    legacy = json.loads(point("20260101T000000Z", "20260101T000000Z").to_json())
    del legacy["disks"][0]["checksum"]
    legacy["disks"][0]["blake3"] = blake3.blake3(b"backup").hexdigest()
    (point_dir / "manifest.json").write_text(json.dumps(legacy))
    [loaded] = store.points()
    assert loaded.disks[0].algorithm == "blake3" and loaded.sums_file == "B3SUMS"
    assert store.verify(loaded) == []
    (point_dir / "vda.qcow2").write_bytes(b"bitrot")
    assert store.verify(loaded) == [f"{point_dir}/vda.qcow2: checksum mismatch"]


def test_guest_agent_channel_is_found_by_its_name() -> None:
    channel = "<channel type='unix'><target type='virtio' name='{}'/></channel>"
    assert has_guest_agent(f"<domain><devices>{channel.format('org.qemu.guest_agent.0')}</devices></domain>")
    assert not has_guest_agent(f"<domain><devices>{channel.format('org.example.other')}</devices></domain>")
    assert not has_guest_agent("<domain><devices/></domain>")


def test_backup_xml_raw_disk_full_and_no_checkpoint() -> None:
    xml = """<domain><devices>
      <disk type='file' device='disk'><driver type='qcow2'/><source file='/d/a.qcow2'/><target dev='vda'/></disk>
      <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/vg/b'/><target dev='vdb'/></disk>
      <disk type='file' device='cdrom'><source file='/d/seed.iso'/><target dev='sda'/></disk>
    </devices></domain>"""
    disks, skipped = domain_disks(xml)
    assert disks == [VmDisk("vda", "/d/a.qcow2", "qcow2"), VmDisk("vdb", "/dev/vg/b", "raw")]
    assert skipped == ["sda"]
    root = ET.fromstring(backup_xml(Path("/j/nbd.sock"), Path("/j"), disks, skipped, "cp1"))
    assert root.get("mode") == "pull" and root.findtext("incremental") == "cp1"
    server = root.find("server")
    assert server is not None and server.attrib == {"transport": "unix", "socket": "/j/nbd.sock"}
    modes = {d.get("name"): (d.get("backup"), d.get("backupmode")) for d in root.iter("disk")}
    assert modes == {"vda": ("yes", None), "vdb": ("yes", "full"), "sda": ("no", None)}
    assert root.find("./disks/disk[@name='vdb']/scratch").get("file") == "/j/vdb.scratch"  # type: ignore[union-attr]
    full = ET.fromstring(backup_xml(Path("/j/nbd.sock"), Path("/j"), disks, skipped, None))
    assert full.find("incremental") is None and full.find("./disks/disk[@name='vdb']").get("backupmode") is None  # type: ignore[union-attr]
    cp = ET.fromstring(checkpoint_xml("kvmconf-1", disks, skipped))
    assert {d.get("name"): d.get("checkpoint") for d in cp.iter("disk")} == {"vda": "bitmap", "vdb": "no", "sda": "no"}


def test_max_interval_of_schedules() -> None:
    assert max_interval("30 2 * * *") == dt.timedelta(days=1)
    assert max_interval("0 */6 * * *") == dt.timedelta(hours=6)
    assert max_interval("0 3 * * 1-5") == dt.timedelta(days=3)  # Friday to Monday
    assert max_interval("15 1 * * 0") == dt.timedelta(days=7)
    # Days of the month and months: the longest gap may cross a month or the year.
    assert max_interval("0 2 1,15 * *") == dt.timedelta(days=17)  # Jan 15 to Feb 1
    assert max_interval("0 2 1 */2 *") == dt.timedelta(days=62)  # Jul 1 to Sep 1
    assert max_interval("0 2 1 1 *") == dt.timedelta(days=366)  # once a year (the walk includes a leap year)
    # cron ANDs the day fields when one starts with '*': odd days that are Mondays, not odd days or Mondays
    assert max_interval("0 3 */2 * 1") == dt.timedelta(days=21)


def every_run_gap(schedule: str) -> dt.timedelta:
    """The definition, plainly: every run of the 732 days from 2024-01-01 in minutes, the longest gap between two."""
    fields = schedule.split()
    minutes, hours, doms, months = (sorted(field_values(f, lo, hi)) for f, (lo, hi) in
                                    zip(fields[:4], ((0, 59), (0, 23), (1, 31), (1, 12)), strict=True))
    dows = {d % 7 for d in field_values(fields[4], 0, 7)}
    runs = []
    for index in range(732):
        day = dt.date(2024, 1, 1) + dt.timedelta(days=index)
        day_dom, day_dow = day.day in doms, (day.isoweekday() % 7) in dows
        either = not fields[2].startswith("*") and not fields[4].startswith("*")  # cron(8): '*/2' is unrestricted
        if day.month in months and ((day_dom or day_dow) if either else (day_dom and day_dow)):
            runs += [index * 1440 + h * 60 + m for h in hours for m in minutes]
    if len(runs) < 2:
        return dt.timedelta(days=732)
    return dt.timedelta(minutes=max(b - a for a, b in itertools.pairwise(runs)))


def _cron_field(low: int, high: int) -> st.SearchStrategy[str]:
    single = st.integers(low, high).map(str)
    ranged = st.tuples(st.integers(low, high), st.integers(low, high)).map(lambda ab: f"{min(ab)}-{max(ab)}")
    stepped = st.tuples(st.sampled_from(["*", f"{low}-{high}"]), st.integers(1, high)).map(lambda s: f"{s[0]}/{s[1]}")
    lists = st.lists(single | ranged, min_size=1, max_size=3).map(",".join)
    return st.just("*") | single | stepped | lists


def test_a_bar_in_the_checks_text_is_not_taken_for_the_start_of_its_performance_data() -> None:
    line = report.plugin_output("BACKUP WARNING - vm: last run failed (qemu-img: a|b)", "vm_chain=1;;;0")
    assert line == "BACKUP WARNING - vm: last run failed (qemu-img: a\u00a6b) | vm_chain=1;;;0"
    assert line.count("|") == 1
    assert report.plugin_output("BACKUP UNKNOWN - x", "") == "BACKUP UNKNOWN - x"


@settings(max_examples=40, deadline=None)
@given(st.tuples(_cron_field(0, 59), _cron_field(0, 23), _cron_field(1, 31), _cron_field(1, 12), _cron_field(0, 7)))
def test_max_interval_is_the_longest_gap_between_runs(fields: tuple[str, ...]) -> None:
    schedule = " ".join(fields)
    assert max_interval(schedule) == every_run_gap(schedule)


def test_status_and_nagios_go_critical_when_too_old(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "vm")
    m = point("20261120T023000Z", "20261120T023000Z")
    store.point_dir(m.time).mkdir(parents=True)
    write_point_files(store.point_dir(m.time), m)
    limit = max_interval("30 2 * * *") + GRACE
    fresh = report.vm_status(tmp_path, None, "vm", dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC))
    assert (fresh.last_good, fresh.chain_length, fresh.points) == ("20261120T023000Z", 1, 1)
    assert report.nagios([fresh], limit) == (0, "BACKUP OK - vm 24.5 h")
    stale = report.vm_status(tmp_path, None, "vm", dt.datetime(2026, 11, 21, 5, 0, tzinfo=dt.UTC))
    code, line = report.nagios([stale], limit)
    assert code == 2 and line.startswith("BACKUP CRITICAL - vm: last good 20261120T023000Z, 26.5 h old"), line
    none = report.vm_status(tmp_path, None, "other", dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC))
    assert report.nagios([fresh, none], limit)[0] == 2
    journal.write(store.dir, {"time": "20261121T023000Z", "ok": False, "error": "boom"}, journal.LAST_RUN)
    failed = report.vm_status(tmp_path, None, "vm", dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC))
    assert report.nagios([failed], limit) == (1, "BACKUP WARNING - vm: last run failed (20261121T023000Z: boom)")
    nas = "vm: the NAS copy of 20261121T023000Z does not verify (checksum mismatch: vda.qcow2)"
    journal.write(store.dir, {"time": "20261121T023000Z", "ok": True, "error": nas}, journal.LAST_RUN)
    nas_failed = report.vm_status(tmp_path, None, "vm", dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC))
    assert report.nagios([nas_failed], limit)[0] == 1  # the local point is good; the NAS stage is not
    assert report.perfdata([failed, none], limit) == (f"vm_age=88200s;;93600;0 vm_stored={failed.stored}B;;;0"
                                                      " vm_chain=1;;;0 other_age=U;;93600;0 other_stored=0B;;;0"
                                                      " other_chain=0;;;0")
    table = report.format_table([failed, none], limit).splitlines()
    assert table[1].split()[6:9] == [f"{failed.stored / 2**20:.1f}", "MiB", "0"] and "boom" in table[1]
    assert table[2].split() == ["other", "-", "-", "0", "0", "-", "0", "no", "backup", "yet"]  # no size: not 0.0


def test_backup_status_task_and_nagios_exit_code(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    site = (root / "site.toml").read_text().replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}/b"')
    assert f'dir = "{tmp_path}/b"' in site
    (tmp_path / "site.toml").write_text(site)
    env = {**os.environ, "KVMCONF_CLUSTER": str(root / "cluster.conf"), "KVMCONF_SITE": str(tmp_path / "site.toml")}
    env.pop("KVMCONF_LAB", None)

    def invoke(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    # The [backup] dir missing (its disk not mounted): said, not "no backup", and the table exits 1 too.
    missing = f"the [backup] dir {tmp_path}/b does not exist (is its filesystem mounted?): `fab kvm-setup` creates it"
    result = invoke("backup-status", "--nagios", "--vm", "provision")
    no_point = "provision_age=U;;93600;0 provision_stored=0B;;;0 provision_chain=0;;;0"  # after "|": perfdata
    assert (result.returncode, result.stdout) == (2, f"BACKUP CRITICAL - provision: {missing} (limit 26.0 h)"
                                                     f" | {no_point}\n")
    table = invoke("backup-status")
    assert (table.returncode, table.stderr) == (1, f"kvmconf: {missing}\n")
    assert table.stdout.startswith("VM ") and table.stdout.splitlines()[1].endswith(f"  {missing}")
    (tmp_path / "b").mkdir()
    result = invoke("backup-status", "--nagios", "--vm", "provision")
    assert (result.returncode, result.stdout) == (2, f"BACKUP CRITICAL - provision: no backup (limit 26.0 h)"
                                                     f" | {no_point}\n")
    table = invoke("backup-status")
    assert table.returncode == 0 and table.stdout.startswith("VM ") and "no backup yet" in table.stdout
    unknown = invoke("backup-status", "--vm", "nosuch")
    assert (unknown.returncode, unknown.stderr) == (2, f"kvmconf: 'nosuch' is not a VM of {root}/cluster.conf;"
                                                       " expected one of: provision, mcp, ldap, db, web, ... (8 in all;"
                                                       " `invoke status` lists them)\n")
    several = invoke("backup", "--vm", "web", "--vm", "nosuch", "--vm", "nope")  # all named in one error, none run
    assert (several.returncode, several.stdout) == (2, "")
    assert several.stderr == (f"kvmconf: 'nosuch', 'nope' are not VMs of {root}/cluster.conf; expected one of:"
                              " provision, mcp, ldap, db, web, ... (8 in all; `invoke status` lists them)\n")


def test_status_lists_this_machines_vms_unless_named(example: Cluster, tmp_path: Path) -> None:
    from kvmconf.backup.cluster import status_rows

    site = dataclasses.replace(example.site, backup=dataclasses.replace(example.site.backup, dir=str(tmp_path)))
    cluster = dataclasses.replace(example, site=site)
    # kvm1 is reached over SSH: its VM's backups are on kvm1, where `backup --all` backs it up.
    rows, _ = status_rows(cluster, [])
    assert [r.vm for r in rows] == ["provision", "mcp", "ldap", "db", "web", "login"]
    rows, _ = status_rows(cluster, ["compute1"])
    assert [(r.vm, r.last_good) for r in rows] == [("compute1", None)]


def test_progress_shows_bytes_done_and_total_per_disk(capsys: pytest.CaptureFixture[str]) -> None:
    from kvmconf.backup.engine import _Progress

    now = [100.0]  # the progress's clock, moved by the test: a loaded machine's pauses must not change the lines
    progress = _Progress("vm", enabled=True, clock=lambda: now[0])
    vda, vdb = progress.disk("vda", 64 << 20), progress.disk("vdb", 32 << 20)
    vda(3 << 20)
    now[0] += 0.1
    vda(4 << 20)  # within 0.2 s of the last redraw: skipped
    vda(64 << 20)  # the end of a disk is always shown, and keeps its line
    vdb(32 << 20)
    progress.done()
    silent = _Progress("vm", enabled=False)  # cron: no terminal, no progress lines in the log
    silent.disk("vda", 64 << 20)(64 << 20)
    silent.done()
    assert capsys.readouterr().err == "\rvm: vda 3/64 MiB   \rvm: vda 64/64 MiB\n\rvm: vdb 32/32 MiB\n"


def test_status_of_a_missing_backup_dir_says_so_not_no_backup(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 4, tzinfo=dt.UTC)
    root = tmp_path / "backup-disk" / "kvmconf"  # the disk not mounted: the directory below its mount point is missing
    rows = [report.vm_status(root, None, vm, now) for vm in ("web", "db")]
    missing = f"the [backup] dir {root} does not exist (is its filesystem mounted?): `fab kvm-setup` creates it"
    assert [r.unreadable for r in rows] == [missing, missing]
    assert report.nagios(rows, dt.timedelta(hours=26)) == (2, f"BACKUP CRITICAL - web, db: {missing} (limit 26.0 h)")
    assert report.format_table(rows, dt.timedelta(hours=26)).splitlines()[1].endswith(f"  {missing}")


def test_a_critical_nagios_line_still_lists_the_other_vms_warnings(tmp_path: Path) -> None:
    now = dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC)
    store = VmStore(tmp_path, "web")
    m = point("20261120T023000Z", "20261120T023000Z")
    store.point_dir(m.time).mkdir(parents=True)
    write_point_files(store.point_dir(m.time), m)
    journal.write(store.dir, {"time": "20261121T023000Z", "ok": False, "error": "boom"}, journal.LAST_RUN)
    rows = [report.vm_status(tmp_path, None, vm, now) for vm in ("db", "web", "ldap")]
    assert report.nagios(rows, max_interval("30 2 * * *") + GRACE) == (
        2, "BACKUP CRITICAL - db, ldap: no backup (limit 26.0 h); also WARNING - web: last run failed"
           " (20261121T023000Z: boom)")


def test_nagios_with_no_vm_to_check_says_so() -> None:
    assert report.nagios([], dt.timedelta(hours=26)) == (
        0, "BACKUP OK - no VM to check (none with backup=yes has its host on this machine)")


def test_a_failure_after_the_point_was_made_is_labelled_with_its_step() -> None:
    from kvmconf.backup.cluster import describe
    from kvmconf.backup.engine import Outcome

    made = point("20261120T023000Z", "20261120T023000Z")
    head = "vm: full backup 20261120T023000Z ok, 1.0 MiB stored in 1.0 s (vda)"
    assert describe(Outcome("vm", True, made, "retention: Permission denied", failed_step="retention")) == (
        f"{head}\n  retention failed: retention: Permission denied")  # not "NAS: ..."
    assert describe(Outcome("vm", True, made, "boom")) == f"{head}\n  a step after the point was made failed: boom"
    assert describe(Outcome("vm", True, made)) == head
