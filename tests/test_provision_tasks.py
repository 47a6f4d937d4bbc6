"""The invoke tasks as the admin runs them: listing, messages and exit statuses (no daemon needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Program

import tasks

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "qemu+unix:///system?socket=/nonexistent/kvmconf-test/libvirt-sock"


def invoke(*args: str, site: Path | None = None, cluster: Path | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}
    environment.update(KVMCONF_CLUSTER=str(cluster or ROOT / "cluster.conf"),
                       KVMCONF_SITE=str(site or ROOT / "site.toml"), **env)
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def site_with_uris(tmp_path: Path, uri: str) -> Path:
    """The example site.toml with every host's URI replaced."""
    lines = [f'uri = "{uri}"' if line.startswith("uri = ") else line
             for line in (ROOT / "site.toml").read_text().splitlines()]
    path = tmp_path / "site.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_task_is_listed_with_the_first_line_of_its_docstring() -> None:
    listed = invoke("--list", "--list-format=json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    helps = {t["name"]: t["help"] for t in data["tasks"]}
    helps.update({f"lab.{t['name']}": t["help"] for c in data["collections"] for t in c["tasks"]})
    assert set(helps) == {"provision", "plan", "status", "start", "stop", "destroy", "lab.up", "lab.down",
                          "provision-server", "reinstall", "backup", "restore", "backup-status", "keyscan",
                          "capacity", "migrate"}
    for name, help_text in helps.items():
        body = tasks.ns.task_with_config(name)[0].body
        assert help_text == (body.__doc__ or "").splitlines()[0], name


UNKNOWN_HOST = f"kvmconf: 'kvm9' is not a host of {ROOT}/site.toml (expected one of: kvm0, kvm1)\n"


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", sorted(tasks.ns.task_names))
def test_every_task_shows_its_help_for_help_and_h(name: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # invoke's own parser and help on the real collection, in-process: 32 subprocesses would take half a minute.
    with pytest.raises(SystemExit) as done:
        Program(namespace=tasks.ns).run(["invoke", name, flag])
    out = capsys.readouterr()
    assert (done.value.code, out.err) == (0, "")
    docstring = (tasks.ns.task_with_config(name)[0].body.__doc__ or "").splitlines()[0]
    assert out.out.startswith(f"Usage: invoke [--core-opts] {name} ") and f"\n  {docstring}\n" in out.out, out.out


# Usage errors (an unknown VM or host, a missing --vm) exit 2 in every task, as `python -m generators` does.
@pytest.mark.parametrize(("args", "message"), [
    (("provision",), "kvmconf: name the VMs with --vm NAME (repeatable), or give --all for every VM in cluster.conf"),
    (("provision", "--vm", "web", "--all", "--dry-run"),
     "kvmconf: give --vm NAME or --all, not both (--all means every VM in cluster.conf)\n"),
    (("start", "--vm", "lldap"), f"kvmconf: 'lldap' is not a VM of {ROOT}/cluster.conf (did you mean ldap?)"),
    (("destroy", "--vm", "nosuchvm", "--purge", "--force"), f"kvmconf: 'nosuchvm' is not a VM of {ROOT}/cluster.conf"),
    (("status", "--host", "kvm9"), UNKNOWN_HOST),
    (("start",), "kvmconf: name the VM with --vm NAME\n"),
    (("destroy", "--purge", "--force"), "kvmconf: name the VM with --vm NAME\n"),
    (("migrate", "--vm", "db"), "kvmconf: name the host to move the VM to with --to HOST\n"),
    (("capacity", "--offline", "--host", "kvm0", "--host", "kvm9"), UNKNOWN_HOST),
])
def test_a_wrong_request_says_what_is_allowed(args: tuple[str, ...], message: str) -> None:
    result = invoke(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr


def test_reinstall_refuses_an_unknown_vm_as_every_task_does() -> None:
    result = invoke("reinstall", "--vm", "mpc")
    assert (result.returncode, result.stderr) == (
        2, f"kvmconf: 'mpc' is not a VM of {ROOT}/cluster.conf (did you mean mcp?); expected one of: provision,"
           " mcp, ldap, db, web, ... (8 in all; `invoke status` lists them)\n")


def test_an_invalid_cluster_conf_is_reported_with_its_line_and_nothing_is_contacted(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.conf"
    bad.write_text("web\t52:54:00:zz:00:01\t192.168.50.21\t1024\t10\t1\t-\n")
    result = invoke("plan", cluster=bad)
    assert result.returncode == 1
    assert result.stderr == (f"{bad}:1:5: column 'mac': '52:54:00:zz:00:01' is not a MAC address"
                             " (expected xx:xx:xx:xx:xx:xx)\nkvmconf: 1 problem\n")


def test_a_lab_that_is_not_up_is_named(tmp_path: Path) -> None:
    result = invoke("status", KVMCONF_LAB=str(tmp_path / "lab"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"kvmconf: KVMCONF_LAB={tmp_path / 'lab'} but no lab is up there:"
                                    " start it with `invoke lab.up`")


def test_plan_and_status_show_every_host_and_fail_when_one_is_unreachable(tmp_path: Path) -> None:
    site = site_with_uris(tmp_path, NOWHERE)
    for task in ("plan", "status"):
        result = invoke(task, site=site)
        assert result.returncode == 1
        assert result.stderr == "kvmconf: some hosts could not be reached\n"
        for host in ("kvm0", "kvm1"):
            assert f"host '{host}': cannot connect to libvirt at {NOWHERE}" in result.stdout


def test_plan_and_status_on_the_test_driver(tmp_path: Path) -> None:
    site = site_with_uris(tmp_path, "test:///default")
    plan = invoke("plan", site=site)
    assert plan.returncode == 0, plan.stderr
    assert ("kvm0 (test:///default):\n  + provision  create qcow2 overlay /var/lib/libvirt/images/provision.qcow2"
            in plan.stdout)
    assert "  ? test  defined on this host, not in cluster.conf (left alone)" in plan.stdout
    assert plan.stdout.endswith("8 to create, 0 to change, 0 unchanged\n")
    status = invoke("status", "--host", "kvm1", site=site)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].split() == ["VM", "STATE", "IP", "RAM", "MB", "VCPUS", "DISK", "GB",
                                                     "(virt/alloc)", "AUTOSTART", "DRIFT", "FROM", "CLUSTER.CONF"]
    assert "compute1  not defined  192.168.50.101" in status.stdout
