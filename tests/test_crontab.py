"""The backup cron.d file: golden file, its one job line, when it is emitted, and quoting."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from generators import crontab
from generators.model import Cluster
from generators.validate import load_cluster
from tests.golden import assert_golden
from tests.tools import ROOT, require_tool, run

PATH = PurePosixPath("cron/kvmconf-backup")


def _text(cluster: Cluster) -> str:
    text = crontab.render(cluster)[PATH]
    assert isinstance(text, str)
    return text


def _jobs(text: str) -> list[str]:
    """The lines that are neither comments, blank, nor environment settings."""
    return [line for line in text.splitlines() if line and not line.startswith("#") and not re.match(r"[A-Z_]+=", line)]


def _job(text: str) -> str:
    """The backup's job line: the first one (the verify job follows it)."""
    jobs = _jobs(text)
    assert len(jobs) in (1, 2), jobs
    return jobs[0]


def _with_backup(cluster: Cluster, **changes: Any) -> Cluster:
    backup = dataclasses.replace(cluster.site.backup, **changes)
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, backup=backup))


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("crontab", crontab.render(example), regenerate)


def test_job_line_is_five_schedule_fields_then_root_then_the_backup_command(example: Cluster) -> None:
    fields = _job(_text(example)).split(maxsplit=6)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    assert fields[5] == "root"
    assert fields[6] == "{ cd /root/kvmconf && .venv/bin/invoke backup --all; } >> /var/log/kvmconf-backup.log 2>&1"


def test_environment_comes_before_the_job(example: Cluster) -> None:
    lines = _text(example).splitlines()
    assert lines.index("SHELL=/bin/sh") < lines.index(_job(_text(example)))
    assert any(line.startswith("PATH=/usr/local/sbin:") for line in lines)
    assert _text(example).endswith("2>&1\n")  # cron ignores a last line without a newline


def test_the_verify_job_runs_weekly_by_default_and_not_at_all_when_turned_off(example: Cluster) -> None:
    jobs = _jobs(_text(example))
    assert jobs[1] == ("30 4 * * 0 root { cd /root/kvmconf && .venv/bin/invoke backup-verify --all; }"
                       " >> /var/log/kvmconf-backup.log 2>&1")
    assert _jobs(_text(_with_backup(example, verify_schedule="0 3 1 * *")))[1].startswith("0 3 1 * * root ")
    off = _text(_with_backup(example, verify_schedule=""))
    assert len(_jobs(off)) == 1 and "backup-verify" not in off


def test_schedule_with_extra_spaces_still_gives_five_fields(tmp_path: Path) -> None:
    # site.toml's schedule is read with its spaces evened out: the cron line and Nagios's comment show it so.
    site = (ROOT / "site.toml").read_text()
    assert site.count('schedule = "30 2 * * *"') == 1
    (tmp_path / "site.toml").write_text(site.replace('schedule = "30 2 * * *"', 'schedule = "  0  */6 * * 1-5 "'))
    cluster = load_cluster(ROOT / "cluster.conf", tmp_path / "site.toml")
    assert cluster.site.backup.schedule == "0 */6 * * 1-5"
    assert _job(_text(cluster)).startswith("0 */6 * * 1-5 root ")


def test_comments_list_covered_vms_by_host_and_the_excluded_ones(example: Cluster) -> None:
    text = _text(example)
    assert "#   kvm0: provision mcp ldap db web login\n#   kvm1: compute1\n" in text
    assert "# Excluded (backup=no):\n#   scratch\n" in text
    assert "scratch" not in text.split("# Excluded")[0]


def test_not_emitted_when_no_vm_is_backed_up(example: Cluster) -> None:
    cluster = dataclasses.replace(example, vms=tuple(dataclasses.replace(vm, backup=False) for vm in example.vms))
    assert crontab.render(cluster) == {}


def test_no_excluded_section_when_every_vm_is_backed_up(example: Cluster) -> None:
    cluster = dataclasses.replace(example, vms=tuple(dataclasses.replace(vm, backup=True) for vm in example.vms))
    assert "Excluded" not in _text(cluster)


def test_percent_is_escaped_and_spaces_quoted_in_paths(example: Cluster) -> None:
    job = _job(_text(_with_backup(example, checkout="/srv/kvm conf", log="/var/log/backup-%d.log")))
    assert job.endswith("root { cd '/srv/kvm conf' && .venv/bin/invoke backup --all; } >> /var/log/backup-\\%d.log"
                        " 2>&1")


@pytest.mark.consumer
def test_job_command_is_valid_sh(example: Cluster) -> None:
    job = _job(_text(_with_backup(example, checkout="/srv/kvm conf", log="/var/log/it's-%d.log")))
    command = job.split(maxsplit=6)[6].replace("\\%", "%")  # what cron hands to /bin/sh
    result = run([require_tool("sh"), "-n", "-c", command])
    assert result.returncode == 0, result.stderr


@pytest.mark.consumer
def test_a_checkout_that_is_gone_is_said_in_the_log_not_only_in_cron_mail(example: Cluster, tmp_path: Path) -> None:
    log = tmp_path / "backup-%d.log"  # a % as well: cron's escaping must give sh the path back
    job = _job(_text(_with_backup(example, checkout=str(tmp_path / "gone"), log=str(log))))
    command = job.split(maxsplit=6)[6].replace("\\%", "%")  # what cron hands to /bin/sh
    sh = require_tool("sh")
    result = run([sh, "-c", command])
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "")  # cron would mail nothing
    assert log.read_text() == f"{sh}: 1: cd: can't cd to {tmp_path}/gone\n"


def test_long_vm_lists_wrap_into_comment_lines_naming_every_vm(example: Cluster) -> None:
    many = tuple(dataclasses.replace(example.vm("db"), name=f"node-{i:03d}") for i in range(60))
    text = _text(dataclasses.replace(example, vms=many))
    comments = [line for line in text.splitlines() if line.startswith("#   ")]
    assert len(comments) > 1 and all(len(line) <= 100 for line in comments)
    assert comments[0].startswith("#   kvm0: node-000 node-001 ")
    names = [word for line in comments for word in line[1:].split() if word != "kvm0:"]
    assert names == [f"node-{i:03d}" for i in range(60)]  # hyphens in names are never wrap points
