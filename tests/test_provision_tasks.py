"""The invoke tasks as the admin runs them: listing, messages and exit statuses (no daemon needed)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from invoke import Program

import tasks
from tests.tools import ROOT, mount_tmpfs

NOWHERE = "qemu+unix:///system?socket=/nonexistent/kvmconf-test/libvirt-sock"


def environment(site: Path | None = None, cluster: Path | None = None, **env: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}
    environment.update(KVMCONF_CLUSTER=str(cluster or ROOT / "cluster.conf"),
                       KVMCONF_SITE=str(site or ROOT / "site.toml"), **env)
    return environment


def invoke(*args: str, site: Path | None = None, cluster: Path | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=environment(site, cluster, **env),
                          capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def answer_on_a_terminal(args: tuple[str, ...], site: Path, answer: Callable[[subprocess.Popen[bytes], int], None],
                         ) -> tuple[int, str, str]:
    """Run `invoke ARGS` with a terminal (a pty) as stdin; once its question is out, ``answer(child, pty)``."""
    master, slave = os.openpty()
    # Python ignores Ctrl-C when it starts with SIGINT ignored, as under `make check &`: undo that, as a shell would.
    child = subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=environment(site),
                             stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    try:
        assert child.stdout is not None
        asked, deadline = b"", time.monotonic() + 60
        while not asked.endswith(b"[y/N] "):
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(child.stdout.fileno(), 4096) if ready else b""
            assert chunk, f"no question asked: {asked!r}"
            asked += chunk
        answer(child, master)
        out, err = child.communicate(timeout=60)
        return child.returncode, (asked + out).decode(), err.decode()
    finally:
        os.close(master)
        if child.poll() is None:  # it never asked, or never ended: do not leave it behind
            child.kill()
            child.communicate()


def site_with_uris(tmp_path: Path, uri: str, disk_dir: Path | None = None) -> Path:
    """The example site.toml with every host's URI (and disk_dir, if given) replaced."""
    lines = [f'uri = "{uri}"' if line.startswith("uri = ") else
             f'disk_dir = "{disk_dir}"' if disk_dir and line.startswith("disk_dir = ") else line
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
                          "provision-server", "reinstall", "backup", "restore", "backup-status", "backup-verify",
                          "keyscan", "capacity", "migrate"}
    for name, help_text in helps.items():
        body = tasks.ns.task_with_config(name)[0].body
        assert help_text == (body.__doc__ or "").splitlines()[0], name


@pytest.mark.parametrize("module", ["libvirt", "paramiko"])
def test_without_the_tasks_packages_invoke_says_how_to_install_them(module: str) -> None:
    # `make` alone installs requirements.txt, without libvirt-python and Fabric: invoke --list was a 20-line
    # ModuleNotFoundError. That venv is stood for by blocking the module's import (None in sys.modules).
    program = (f"import sys; sys.modules[{module!r}] = None; from invoke.main import program;"
               " sys.argv = ['invoke', '--list']; program.run()")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"kvmconf: the tasks need {module} in .venv, and `make` alone installs only what generating needs:"
               " run `make test-deps` once\n")


def test_a_task_run_from_a_subdirectory_takes_the_checkouts_inputs() -> None:
    # invoke finds tasks.py above hosts/, and cluster.conf and site.toml were then looked for in hosts/.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}

    def capacity(where: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "invoke", "capacity", "--offline"], cwd=where,
                              env=environment, capture_output=True, text=True, timeout=120, check=False)

    at_the_top, below = capacity(ROOT), capacity(ROOT / "hosts")
    assert (below.returncode, below.stderr) == (0, ""), below.stderr
    assert below.stdout == at_the_top.stdout and "kvm0 (qemu:///system): " in below.stdout


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
    # every unknown --host at once (each named once), not only the first
    (("status", "--host", "kvm9", "--host", "kvm0", "--host", "kvm-1", "--host", "kvm9"),
     f"kvmconf: 'kvm9', 'kvm-1' are not hosts of {ROOT}/site.toml (expected one of: kvm0, kvm1)\n"),
    (("capacity", "--offline", "--host", "kvm7", "--host", "kvm8"),
     f"kvmconf: 'kvm7', 'kvm8' are not hosts of {ROOT}/site.toml (expected one of: kvm0, kvm1)\n"),
    # every unknown --vm at once too, each with its close names
    (("provision", "--vm", "web", "--vm", "nosuch", "--vm", "nope", "--vm", "wbe"),
     f"kvmconf: 'nosuch', 'nope', 'wbe' (did you mean web?) are not VMs of {ROOT}/cluster.conf; expected one of:"
     " provision, mcp, ldap, db, web, ... (8 in all; `invoke status` lists them)\n"),
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
        assert result.stderr == "kvmconf: could not ask every host: kvm0, kvm1 (the report above says why)\n"
        for host in ("kvm0", "kvm1"):
            assert f"host '{host}': cannot connect to libvirt at {NOWHERE}" in result.stdout


def test_plan_and_status_on_the_test_driver(tmp_path: Path) -> None:
    site = site_with_uris(tmp_path, "test:///default")
    plan = invoke("plan", site=site)
    assert plan.returncode == 0, plan.stderr
    # Where the example's cloud image is not on this machine, plan names it, as provision would stop on it.
    base = "/var/lib/libvirt/images/base/debian-12-genericcloud-amd64.qcow2"
    named = (f"kvm0 (test:///default):\n  ! provision, login: base image {base} for their install=cloud overlays is"
             " not usable on kvm0 (put the OS's cloud image there, or fix cloud_image in site.toml): ")
    assert Path(base).exists() or named in plan.stdout
    assert "\n  + provision  create qcow2 overlay /var/lib/libvirt/images/provision.qcow2 (20 GB) on " in plan.stdout
    assert "  ? test  defined on this host, not in cluster.conf (left alone)" in plan.stdout
    assert plan.stdout.endswith("8 to create, 0 to change, 0 unchanged\n")
    status = invoke("status", "--host", "kvm1", site=site)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].split() == ["VM", "STATE", "IP", "RAM", "MB", "VCPUS", "DISK", "GB",
                                                     "(virt/alloc)", "AUTOSTART", "DRIFT", "FROM", "CLUSTER.CONF"]
    assert "compute1  not defined  192.168.50.101" in status.stdout


def end_of_input(_child: subprocess.Popen[bytes], terminal: int) -> None:
    os.write(terminal, b"\x04")  # Ctrl-D


def interrupt(child: subprocess.Popen[bytes], _terminal: int) -> None:
    # A SIGINT that lands after the question is written but before the read starts is only acted on once
    # the read returns: never, here. An admin's Ctrl-C comes when the read waits; so does this one.
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child.pid}/syscall").read_text().split()[1:2] != ["0x0"]:  # a call on fd 0 (stdin)
        assert time.monotonic() < deadline, "the question never waited for an answer"
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)  # what Ctrl-C makes the terminal send


@pytest.mark.parametrize("answer", [end_of_input, interrupt], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_or_ctrl_c_at_the_purge_question_is_a_no(
        tmp_path: Path, answer: Callable[[subprocess.Popen[bytes], int], None]) -> None:
    disk = tmp_path / "db.img"  # db's disk (disk=raw) on the test driver's kvm0, where db is not defined
    disk.write_bytes(b"the only copy")
    site = site_with_uris(tmp_path, "test:///default", disk_dir=tmp_path)
    code, out, err = answer_on_a_terminal(("destroy", "--vm", "db", "--purge"), site, answer)
    assert (code, out, err) == (1, f"db on kvm0: remove {disk} for good. Go ahead? [y/N] \n",
                                "kvmconf: db: not destroyed (not confirmed; nothing was changed)\n")
    assert disk.read_bytes() == b"the only copy"


@pytest.mark.parametrize(("to", "message"), [
    ("kvm0", "kvmconf: db: cluster.conf places it on kvm0 already\n"),
    # Every host on one URI: a move between two of them is no move either.
    ("kvm1", f"kvmconf: db: kvm0 and kvm1 are the same libvirt ({NOWHERE}): nothing to move\n"),
])
def test_a_migration_to_where_the_vm_is_already_is_a_usage_error(tmp_path: Path, to: str, message: str) -> None:
    """Exit 2 as for an unknown --to: the request has nothing to do, whatever the hosts say (they are unreachable
    here, and only asked for a hint)."""
    result = invoke("migrate", "--vm", "db", "--to", to, site=site_with_uris(tmp_path, NOWHERE))
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message)


def test_a_failed_runs_lines_come_before_its_error_in_a_log_of_both_streams(tmp_path: Path) -> None:
    """As cron's `>> log 2>&1` or `2>&1 | tee` keep them. Printed lines waited in Python's buffer until the exit,
    after the error: such a log ended with "db: started", as if the run had gone on after its failure."""
    site = site_with_uris(tmp_path, "test:///default", disk_dir=tmp_path / "kvm0")
    (tmp_path / "kvm0").mkdir()
    readonly = tmp_path / "kvm1"  # kvm1's disk_dir refuses writes: scratch, provisioned after db, fails there
    site.write_text(site.read_text().replace('[hosts.kvm1]\nuri = "test:///default"\n',
                                             f'[hosts.kvm1]\nuri = "test:///default"\ndisk_dir = "{readonly}"\n'))
    cluster = tmp_path / "cluster.conf"
    cluster.write_text((ROOT / "cluster.conf").read_text().replace("install=none backup=no", "host=kvm1 install=none"
                                                                   " backup=no"))
    env = environment(site, cluster)
    env.pop("PYTHONUNBUFFERED", None)  # as an admin's shell has it
    with mount_tmpfs(readonly, "1m", read_only=True):
        result = subprocess.run([sys.executable, "-m", "invoke", "provision", "--vm", "db", "--vm", "scratch"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=120, check=False, stdin=subprocess.DEVNULL)
    lines = result.stdout.splitlines()
    created = f"db: created raw disk {tmp_path / 'kvm0' / 'db.img'} (200 GB, thin)"
    assert result.returncode == 1, result.stdout
    assert lines[:3] == [created, "db: defined on kvm0", "db: started"], result.stdout
    assert lines[3].startswith("kvmconf: provisioning failed: localhost: `qemu-img create "), result.stdout
    assert lines[-1] == f"undone: db: started; db: defined on kvm0; {created}", result.stdout
