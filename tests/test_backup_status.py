"""`invoke backup-status` and its Nagios check on a chain that lacks a point (deleted by hand): the newest point
cannot be restored, whatever its age. It used to read as the last good one, and the check was OK."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from invoke import Context, Exit

from kvmconf.backup import journal, report
from kvmconf.backup.store import TIME_FORMAT, VmStore
from tests.test_backup_safety import local_point
from tests.test_provision_tasks import invoke
from tests.tools import ROOT


def test_a_newest_point_whose_chain_lacks_a_point_is_critical(tmp_path: Path) -> None:
    """As the admin and Nagios run them, on the example cluster (provision's host, kvm0, is this machine)."""
    site = tmp_path / "site.toml"
    site.write_text((ROOT / "site.toml").read_text().replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}/b"'))
    now = dt.datetime.now(dt.UTC)
    full, inc1, inc2 = ((now - dt.timedelta(hours=hours)).strftime(TIME_FORMAT) for hours in (3, 2, 1))
    store = VmStore(tmp_path / "b", "provision")  # recent points: the age is fine
    local_point(store.root, store.vm, inc2, b"inc2",
                local_point(store.root, store.vm, inc1, b"inc1", local_point(store.root, store.vm, full, b"full")))
    store.remove_point(inc1)
    problem = (f"the newest point {inc2} cannot be restored (restore point {inc1} is missing from {store.dir} (deleted"
               f" or moved away): the points built on it cannot be restored ({inc2}); restore an earlier point or one"
               " of a later chain)")
    nagios = invoke("backup-status", "--nagios", "--vm", "provision", site=site)
    assert nagios.returncode == 2, nagios.stdout + nagios.stderr
    assert nagios.stdout.startswith(f"BACKUP CRITICAL - provision: {problem} (limit "), nagios.stdout
    table = invoke("backup-status", "--vm", "provision", site=site)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].endswith(f"  {problem}"), table.stdout


def test_a_critical_line_says_the_vms_last_failure(tmp_path: Path) -> None:
    """Why its backups stopped: a warning's line said it, a critical one dropped it, and the admin it woke had to go
    and run backup-status on the host to learn it."""
    local_point(tmp_path, "web", "20261120T023000Z")
    scratch = "scratch_dir /var/tmp has 2.0 GiB free, the job needs up to 30.0 GiB"
    journal.write(tmp_path / "web", {"time": "20261122T023000Z", "ok": False, "error": scratch}, journal.LAST_RUN)
    (tmp_path / "db").mkdir()
    journal.write(tmp_path / "db", {"time": "20261122T023000Z", "ok": False, "error": "not defined on kvm0"},
                  journal.LAST_RUN)
    now = dt.datetime(2026, 11, 22, 5, 0, tzinfo=dt.UTC)
    rows = [report.vm_status(tmp_path, None, vm, now) for vm in ("web", "db", "ldap")]
    assert report.nagios(rows, dt.timedelta(hours=26)) == (
        2, f"BACKUP CRITICAL - web: last good 20261120T023000Z, 2.1 d old, last run failed (20261122T023000Z:"
           f" {scratch}); db: no backup, last run failed (20261122T023000Z: not defined on kvm0); ldap: no backup"
           " (limit 26.0 h)")


def test_a_multi_line_error_stays_on_the_checks_one_status_line(tmp_path: Path) -> None:
    """libvirt's errors carry QEMU's stderr, lines and all. Nagios takes the first line as the status (the one in
    the mail and the overview) and the rest as long output, perfdata there included: the line broke in the middle of
    the error, and whatever followed it, other VMs' problems and the limit, was no longer on the status line."""
    site = tmp_path / "site.toml"
    site.write_text((ROOT / "site.toml").read_text().replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}/b"'))
    now = dt.datetime.now(dt.UTC)
    local_point(tmp_path / "b", "provision", (now - dt.timedelta(hours=1)).strftime(TIME_FORMAT))
    error = ("internal error: qemu unexpectedly closed the monitor: 2026-11-22T02:30:01.123456Z\n"
             "qemu-system-x86_64: -blockdev {\"driver\":\"file\"}:\r\n  Could not open '/x': Permission denied\n")
    journal.write(tmp_path / "b" / "provision", {"time": "20261122T023000Z", "ok": False, "error": error},
                  journal.LAST_RUN)
    nagios = invoke("backup-status", "--nagios", "--vm", "provision", site=site)
    assert nagios.returncode == 1, nagios.stdout + nagios.stderr
    status, perf = nagios.stdout.split(" | ")
    assert status == ("BACKUP WARNING - provision: last run failed (20261122T023000Z: internal error: qemu unexpectedly"
                      " closed the monitor: 2026-11-22T02:30:01.123456Z qemu-system-x86_64: -blockdev"
                      " {\"driver\":\"file\"}: Could not open '/x': Permission denied)")
    assert perf.startswith("provision_age=") and perf.endswith(" provision_chain=1;;;0\n"), perf
    assert "\n" not in perf[:-1] and "\r" not in nagios.stdout, nagios.stdout


def test_a_check_that_fails_on_several_problems_says_them_on_one_line(tmp_path: Path) -> None:
    """UNKNOWN with a ConfigError, one line per problem: the first problem alone reached the status line."""
    site = tmp_path / "site.toml"
    text = (ROOT / "site.toml").read_text().replace("\nkeep = 2\n", "\nkeep = 0\n")
    site.write_text(text.replace("\nfull_every = 7\n", "\nfull_every = -1\n"))
    keep, full_every = (site.read_text().splitlines().index(line) + 1 for line in ("keep = 0", "full_every = -1"))
    nagios = invoke("backup-status", "--nagios", "--vm", "provision", site=site)
    assert (nagios.returncode, nagios.stdout) == (
        3, f"BACKUP UNKNOWN - backup-status failed: ConfigError: {site}:{keep}:1: key 'backup.keep': 0 is out of range"
           f" (expected a positive integer) {site}:{full_every}:1: key 'backup.full_every': -1 is out of range"
           " (expected a positive integer)\n"), nagios.stderr


def test_a_bug_in_the_nagios_check_is_unknown_with_its_traceback_as_long_output(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A bug is simulated (no input makes one on purpose): status_rows raises what no check of kvmconf raises.
    import tasks
    from kvmconf.backup import cluster

    def broken(*_args: object) -> None:
        raise RuntimeError("a | b")
    monkeypatch.setattr(cluster, "status_rows", broken)
    monkeypatch.setattr(tasks.inputs, "load", lambda: None)
    with pytest.raises(Exit) as ended:
        tasks.backup_status(Context(), ["provision"], nagios=True)
    out, err = capsys.readouterr()
    # check_by_ssh shows stderr in place of the line when there is any: all of it goes to stdout, the status line
    # first (a '|' after it would start perfdata: shown as a broken bar).
    assert (ended.value.code, err) == (3, "")
    status, *long_output = out.splitlines()
    assert status == "BACKUP UNKNOWN - backup-status failed: RuntimeError: a \u00a6 b"
    assert long_output[0] == "Traceback (most recent call last):"
    assert long_output[-1] == "RuntimeError: a \u00a6 b"
