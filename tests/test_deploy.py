"""fab deploy / update-confs / invoke keyscan against real sshds on 127.0.0.x, one chrooted overlay root per VM."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import paramiko
import pytest

from generators.model import Cluster
from kvmconf.deploy import Options, RunReport, recipes, run_cluster, waves
from kvmconf.keyscan import KeyscanFailed, keyscan
from kvmconf.recipes import RECIPE_DIR, RecipeError
from kvmconf.remote import RemoteError, command, connect, resolve, script
from tests import sshfarm
from tests.tools import require_tool

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def farm(example: Cluster) -> Iterator[sshfarm.Farm]:
    require_tool("sshd")
    require_tool("nagios4")  # mcp's hook checks the deployed configuration with it
    started = sshfarm.start([vm.name for vm in example.vms])
    try:
        keyscan([vm.name for vm in example.vms], started.ssh_config)
        yield started
    finally:
        sshfarm.teardown(started.base)


@pytest.fixture()
def hosts_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(RECIPE_DIR, tmp_path / "hosts"))


# A recipe of the tests' own, on a VM the example gives none: one template whose change reloads a service.
APP_VM, APP_CONF, APP_SERVICE = "db", "/etc/kvmconf-test/app.conf", "kvmconf-test-app"


def _add_app_recipe(hosts: Path) -> Path:
    """Write the app recipe into ``hosts`` (a copy of hosts/); returns its template."""
    (hosts / APP_VM).mkdir()
    (hosts / APP_VM / "recipe.toml").write_text(
        f'[[file]]\ndest = "{APP_CONF}"\ntemplate = "app.conf.j2"\nreload = ["{APP_SERVICE}"]\n')
    template = hosts / APP_VM / "app.conf.j2"
    template.write_text("# {{ banner[0] }}\nname={{ vm.name }}\n")
    return template


def _run(cluster: Cluster, farm: sshfarm.Farm, full: bool, recipe_dir: Path | None = None, parallel: int = 4,
         dry_run: bool = False, vms: tuple[str, ...] = ()) -> RunReport:
    return run_cluster(cluster, list(vms), full, Options(farm.ssh_config, parallel, dry_run, recipe_dir))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_deploy_places_rendered_files_in_wave_order(example: Cluster, farm: sshfarm.Farm) -> None:
    report = _run(example, farm, full=True)
    assert not report.failed, "\n".join(r.line() for r in report.failed)
    # Every file of every recipe is on its VM, byte for byte as rendered, with its mode.
    planned = recipes(example, example.vms)
    assert {f.dest for f in planned["mcp"].files} >= {"/etc/nagios4/conf.d/kvmconf/hosts.cfg", "/etc/motd"}
    # provision only gets what `invoke provision-server` needs, run there: it alone deploys dnsmasq and TFTP.
    assert {"dnsmasq-base", "pxelinux", "grub-efi-amd64-bin", "debian-installer-12-netboot-amd64"} \
        <= set(planned["provision"].packages)
    assert "dnsmasq" not in planned["provision"].packages  # Debian's service would answer beside provision-server's
    assert {f.dest for f in planned["provision"].files} == {"/etc/motd", "/etc/hosts"}  # linux-servers' only
    assert [h.name for h in planned["provision"].hooks] == ["provision/hooks/no-debian-dnsmasq.sh"]
    for name, recipe in planned.items():
        for spec in recipe.files:
            placed = farm.upper(name) / spec.dest.lstrip("/")
            assert placed.read_bytes() == spec.content, (name, spec.dest)
            assert oct(placed.stat().st_mode & 0o7777) == oct(int(spec.mode, 8))
    assert not (farm.upper("scratch") / "etc/motd").exists()  # no hostgroup, no recipe
    # Waves from after=: a VM starts only after everything of the earlier waves has ended.
    expected = [["provision", "scratch"], ["mcp", "ldap"], ["db", "login", "compute1"], ["web"]]
    assert [[vm.name for vm in wave] for wave in waves(example.vms)] == expected
    times = {(vm, kind): t for t, vm, kind in report.events}
    for earlier, later in itertools.pairwise(expected):
        assert max(times[vm, "end"] for vm in earlier) <= min(times[vm, "start"] for vm in later)
    # The mcp hook dropped Debian's localhost.cfg and nagios4 -v accepted the generated config (else it fails).
    nagios_cfg = (farm.upper("mcp") / "etc/nagios4/nagios.cfg").read_text()
    assert "\n#cfg_file=/etc/nagios4/objects/localhost.cfg\n" in nagios_cfg
    assert report.reports[[r.vm for r in report.reports].index("mcp")].hooks == ["mcp/hooks/nagios-localhost.sh"]
    # Only the packages missing in the VM are installed, through apt-get.
    ldap = next(r for r in report.reports if r.vm == "ldap")
    assert ldap.installed, "the ldap recipe's packages are not on this machine, so deploy must install them"
    assert farm.log("ldap", "apt-get") == ["install -y -q -o Dpkg::Options::=--force-confdef -o"
                                           " Dpkg::Options::=--force-confold -o DPkg::Lock::Timeout=300"
                                           f" -- {' '.join(ldap.installed)}"]
    assert "reload-or-restart -- nagios4" in farm.log("mcp", "systemctl")


def test_sequential_deploy_follows_cluster_conf_order(example: Cluster, farm: sshfarm.Farm) -> None:
    report = _run(example, farm, full=True, parallel=1)
    assert not report.failed, "\n".join(r.line() for r in report.failed)
    starts = [vm for _, vm, kind in sorted(report.events) if kind == "start"]
    assert starts == [vm.name for vm in example.vms]


def test_second_update_confs_transfers_and_reloads_nothing(example: Cluster, farm: sshfarm.Farm) -> None:
    assert not _run(example, farm, full=True).failed
    farm.clear_logs()
    report = _run(example, farm, full=False)
    assert not report.failed, "\n".join(r.line() for r in report.failed)
    done = sorted((r.vm, r.pushed, r.reloaded) for r in report.reports)
    assert done == sorted((vm.name, [], []) for vm in example.vms)
    assert all(farm.log(vm.name, "systemctl") == [] for vm in example.vms)
    assert sorted(r.line() for r in report.reports) == sorted(f"{vm.name}: done (0 file(s) changed)"
                                                              for vm in example.vms)


def test_changed_template_pushes_one_file_to_its_vms_and_reloads_its_service(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    template = _add_app_recipe(hosts_copy)
    assert not _run(example, farm, full=False, recipe_dir=hosts_copy).failed
    placed = farm.upper(APP_VM) / APP_CONF.lstrip("/")
    before = placed.read_text()
    template.write_text(template.read_text() + "log=debug\n")
    farm.clear_logs()
    report = _run(example, farm, full=False, recipe_dir=hosts_copy)
    assert not report.failed, "\n".join(r.line() for r in report.failed)
    assert {r.vm: r.pushed for r in report.reports if r.pushed} == {APP_VM: [APP_CONF]}
    assert {r.vm: r.reloaded for r in report.reports if r.reloaded} == {APP_VM: [APP_SERVICE]}
    assert farm.log(APP_VM, "systemctl") == [f"reload-or-restart -- {APP_SERVICE}"]
    assert all(farm.log(vm.name, "systemctl") == [] for vm in example.vms if vm.name != APP_VM)
    assert placed.read_text().endswith("log=debug\n")
    backups = list((farm.upper(APP_VM) / "var/lib/kvmconf/backup/etc/kvmconf-test").glob("app.conf.*"))
    assert any(b.read_text() == before for b in backups)
    # A template several VMs share goes to exactly those VMs (every linux-server), one file each, no reload.
    motd = hosts_copy / "group/linux-servers/motd.j2"
    motd.write_text(motd.read_text() + "Welcome.\n")
    report = _run(example, farm, full=False, recipe_dir=hosts_copy)
    servers = [vm.name for vm in example.vms if "linux-servers" in vm.hostgroups]
    assert {r.vm: r.pushed for r in report.reports if r.pushed} == {vm: ["/etc/motd"] for vm in servers}
    assert all(not r.reloaded for r in report.reports)
    assert all(r.pushed == [] for r in _run(example, farm, full=False, recipe_dir=hosts_copy).reports)
    assert not _run(example, farm, full=False).failed  # back to the repository's recipes


def test_a_reload_that_failed_is_done_by_the_next_run_although_no_file_differs_any_more(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    # The file is in place once its reload fails: without a record of the reload still owed, the next run found
    # nothing changed and never reloaded the service, which went on running the old configuration.
    template = _add_app_recipe(hosts_copy)
    assert not _run(example, farm, full=False, recipe_dir=hosts_copy, vms=(APP_VM,)).failed
    template.write_text(template.read_text() + "log=debug\n")
    stub = farm.root(APP_VM) / "usr/local/sbin/systemctl"
    working = stub.read_text()
    try:
        stub.write_text(working + "echo 'Job for kvmconf-test-app.service failed.' >&2\nexit 1\n")
        failed = _run(example, farm, full=False, recipe_dir=hosts_copy, vms=(APP_VM,))
        assert [r.line() for r in failed.reports] == [
            f"{APP_VM}: FAILED at files: reloading {APP_SERVICE}: exit 1: Job for kvmconf-test-app.service failed."]
    finally:
        stub.write_text(working)
    farm.clear_logs()
    dry = _run(example, farm, full=False, recipe_dir=hosts_copy, vms=(APP_VM,), dry_run=True)
    assert [(r.pushed, r.reloaded) for r in dry.reports] == [([], [APP_SERVICE])]
    again = _run(example, farm, full=False, recipe_dir=hosts_copy, vms=(APP_VM,))
    assert [r.line() for r in again.reports] == [f"{APP_VM}: done (0 file(s) changed; reloaded {APP_SERVICE})"]
    assert farm.log(APP_VM, "systemctl") == [f"reload-or-restart -- {APP_SERVICE}"]
    # Owed no more: the run after reloads nothing.
    assert [r.reloaded for r in _run(example, farm, full=False, recipe_dir=hosts_copy, vms=(APP_VM,)).reports] == [[]]
    assert farm.log(APP_VM, "systemctl") == [f"reload-or-restart -- {APP_SERVICE}"]
    assert not _run(example, farm, full=False).failed  # back to the repository's recipes


def test_dry_run_prints_diffs_and_changes_nothing(example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    template = _add_app_recipe(hosts_copy)
    assert not _run(example, farm, full=False, recipe_dir=hosts_copy).failed
    template.write_text(template.read_text() + "log=queries\n")
    farm.clear_logs()
    before = {vm.name: _tree(farm.upper(vm.name)) for vm in example.vms}
    report = _run(example, farm, full=True, recipe_dir=hosts_copy, dry_run=True)
    assert not report.failed, "\n".join(r.line() for r in report.failed)
    app = next(r for r in report.reports if r.vm == APP_VM)
    assert app.pushed == [APP_CONF] and app.reloaded == [APP_SERVICE]
    assert "+log=queries\n" in app.diffs[0] and app.diffs[0].startswith(f"--- {APP_CONF}")
    assert app.line().startswith(f"{APP_VM}: would install ")  # what it lacks depends on this machine
    assert app.line().endswith(f"; change 1 file(s) ({APP_CONF}); reload {APP_SERVICE}; run 0 hook(s)")
    # Packages are checked (read-only), hooks only listed: what the run would do, in the summary's words.
    planned = recipes(example, [example.vm("ldap"), example.vm("mcp")], hosts_copy)
    ldap, mcp = (next(r for r in report.reports if r.vm == name) for name in ("ldap", "mcp"))
    assert ldap.installed and set(ldap.installed) <= set(planned["ldap"].packages)  # slapd is not on this machine
    assert ldap.line() == f"ldap: would install {len(ldap.installed)} package(s) ({', '.join(ldap.installed)});" \
        " change 0 file(s); run 0 hook(s)"
    assert mcp.hooks == [hook.name for hook in planned["mcp"].hooks] != []
    assert f"; run 1 hook(s) ({mcp.hooks[0]})" in mcp.line()
    assert {vm.name: _tree(farm.upper(vm.name)) for vm in example.vms} == before  # no hook ran, nothing installed
    assert farm.log("ldap", "apt-get") == []


def test_fab_deploy_prints_each_vm_as_it_is_done(example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    # ldap's hook waits for the test's go: provision's line must be out while ldap is still being deployed.
    go = farm.root("ldap") / "tmp/kvmconf-test-go"
    go.unlink(missing_ok=True)
    (hosts_copy / "ldap/hooks").mkdir()
    (hosts_copy / "ldap/hooks/wait.sh").write_text("#!/bin/sh\nuntil [ -e /tmp/kvmconf-test-go ]; do sleep 0.1; done\n")
    recipe = hosts_copy / "ldap/recipe.toml"
    recipe.write_text('hooks = ["hooks/wait.sh"]\n' + recipe.read_text())
    env = {**os.environ, "KVMCONF_SSH_CONFIG": str(farm.ssh_config), "KVMCONF_RECIPES": str(hosts_copy)}
    proc = subprocess.Popen([".venv/bin/fab", "deploy", "--vm", "db", "--vm", "ldap", "--vm", "provision"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Through the VM's root, as its hook sees it. Also after 30 s, so a run that prints only at its end ends.
    deadline = threading.Timer(30, go.touch)
    deadline.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("provision: done ("), first
        # The line came while ldap's hook was still waiting: neither we nor the 30 s fallback has released it.
        assert not go.exists(), "provision's line came only after the fallback released ldap's hook"
        assert proc.poll() is None
    finally:
        deadline.cancel()
        go.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = (first + out).splitlines()
    # One line per VM as each ends, in cluster.conf order with --parallel 1, and only then: the summary at the
    # end counts them instead of printing each line again.
    assert [line.split(": ")[0] for line in lines] == ["provision", "ldap", "db", "deploy"]
    assert all(": done (" in line for line in lines[:3]), lines
    assert lines[3] == "deploy: 3 VM(s), 0 failed"
    assert lines[1].endswith("; 1 hook(s) run)")
    go.unlink()


def test_failing_hook_stops_the_next_wave_and_the_summary_names_it(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    (hosts_copy / "ldap/hooks").mkdir()
    (hosts_copy / "ldap/hooks/fail.sh").write_text("#!/bin/sh\necho 'slapd would not start' >&2\nexit 3\n")
    recipe = hosts_copy / "ldap/recipe.toml"
    recipe.write_text('hooks = ["hooks/fail.sh"]\n' + recipe.read_text())
    report = _run(example, farm, full=True, recipe_dir=hosts_copy)
    assert [(r.vm, r.failed_step) for r in report.failed] == [("ldap", "hook ldap/hooks/fail.sh")]
    assert report.not_started == ["db", "login", "compute1", "web"]
    assert {r.vm for r in report.reports} == {"provision", "scratch", "mcp", "ldap"}
    assert report.summary() == "deploy: 4 VM(s), 1 failed: ldap (hook ldap/hooks/fail.sh); not started (an earlier" \
                               " failure stopped later waves): db, login, compute1, web"
    lines = {r.vm: r.line() for r in report.reports}  # what fab printed as each VM ended
    assert lines["ldap"] == "ldap: FAILED at hook ldap/hooks/fail.sh: exit 3: slapd would not start"
    assert lines["mcp"].startswith("mcp: done (")


def test_an_ssh_error_on_one_vm_is_its_failure_line_and_the_others_go_on(example: Cluster,
                                                                        farm: sshfarm.Farm) -> None:
    # ldap's sshd refuses sessions: paramiko's ChannelException is an SSHException, which is no OSError, like the
    # error of a session that dropped (a VM rebooting) as a channel opened. It escaped run_cluster: a traceback,
    # and the reports of mcp and scratch, deployed in the same wave, were lost.
    with sshfarm.reconfigured(farm, "ldap", sshfarm.SESSIONS_REFUSED):
        report = _run(example, farm, full=True, vms=("mcp", "ldap", "scratch"))
    lines = [r.line() for r in report.reports]
    assert lines[1] == "ldap: FAILED at packages: the SSH server refused to open a session (Connect failed)"
    assert lines[0].startswith("mcp: done (") and lines[0].endswith("; 1 hook(s) run)"), lines
    assert lines[2].startswith("scratch: done ("), lines
    assert report.summary() == "deploy: 3 VM(s), 1 failed: ldap (packages)"


_DROP_HOOK = """#!/bin/sh
# As a VM that reboots under its hook: the SSH connection this hook runs in ends (its sshd, killed by PID).
pid=$$
while [ "$pid" -gt 1 ]; do
  pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status")
  case "$(cat "/proc/$pid/comm")" in sshd*) kill -9 "$pid"; exit 0 ;; esac
done
exit 1
"""


def test_a_session_that_ends_under_a_hook_says_so_and_the_others_go_on(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    # paramiko reports a command whose connection ended as exit status -1: the line read "exit -1: no output".
    (hosts_copy / "ldap/hooks").mkdir()
    (hosts_copy / "ldap/hooks/drop.sh").write_text(_DROP_HOOK)
    recipe = hosts_copy / "ldap/recipe.toml"
    recipe.write_text('hooks = ["hooks/drop.sh"]\n' + recipe.read_text())
    report = _run(example, farm, full=True, recipe_dir=hosts_copy, vms=("mcp", "ldap", "scratch"))
    lines = [r.line() for r in report.reports]
    assert lines[1] == ("ldap: FAILED at hook ldap/hooks/drop.sh: the SSH session ended before the command did"
                        " (no exit status): the machine may have rebooted, or the connection dropped")
    assert lines[0].startswith("mcp: done (") and lines[2].startswith("scratch: done ("), lines


def test_deploy_disables_the_debian_dnsmasq_an_earlier_provision_recipe_installed(
        example: Cluster, farm: sshfarm.Farm) -> None:
    """That recipe installed Debian's dnsmasq service, reading the generated config through an /etc/dnsmasq.d
    include: it would answer on the interface where `invoke provision-server` starts its own dnsmasq."""
    root = farm.root("provision")
    unit, include = root / "lib/systemd/system/dnsmasq.service", root / "etc/dnsmasq.d/kvmconf.conf"
    try:
        for path in (unit, include):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("left by an earlier deploy\n")
        farm.clear_logs()
        report = _run(example, farm, full=True, vms=("provision",))
        assert not report.failed, "\n".join(r.line() for r in report.failed)
        assert report.reports[0].hooks == ["provision/hooks/no-debian-dnsmasq.sh"]
        assert farm.log("provision", "systemctl") == ["disable --now dnsmasq.service"]
        assert not include.exists()
        unit.unlink()
        farm.clear_logs()
        # Where the service was never installed, the hook does nothing.
        assert not _run(example, farm, full=True, vms=("provision",)).failed
        assert farm.log("provision", "systemctl") == []
    finally:
        unit.unlink(missing_ok=True)
        include.unlink(missing_ok=True)


def test_a_failed_install_leaves_no_temporary_on_the_vm(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    # b.conf's owner does not exist on the VM: its chown fails once a.conf is in place and b.conf is uploaded.
    (hosts_copy / "ldap/test.j2").write_text("test\n")
    recipe = hosts_copy / "ldap/recipe.toml"
    recipe.write_text(recipe.read_text() + '[[file]]\ndest = "/etc/kvmconf-test/a.conf"\ntemplate = "test.j2"\n'
                      '[[file]]\ndest = "/etc/kvmconf-test/b.conf"\ntemplate = "test.j2"\nowner = "nosuchuser"\n')
    directory = farm.root("ldap") / "etc/kvmconf-test"
    try:
        report = _run(example, farm, full=False, recipe_dir=hosts_copy, vms=("ldap",))
        assert [r.line() for r in report.reports] == [
            "ldap: FAILED at files: installing /etc/kvmconf-test/b.conf: exit 1: chown: invalid user:"
            " 'nosuchuser:root'"]
        assert sorted(p.name for p in directory.iterdir()) == ["a.conf"]  # b.conf's temporary is removed
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _runs_naming_temporaries(dests: list[str]) -> subprocess.Popen[str]:
    """Another deploying process of this machine: it names a temporary for each of ``dests`` as push does
    (runner.temporary_beside, so with its own pid), prints them, then waits to be killed."""
    program = ("import sys, time\nfrom kvmconf.runner import temporary_beside\n"
               "print(*(temporary_beside(d) for d in sys.argv[1:]), flush=True)\ntime.sleep(300)")
    return subprocess.Popen([sys.executable, "-c", program, *dests], stdout=subprocess.PIPE, text=True)


def test_the_next_deploy_removes_what_a_killed_deploy_of_this_machine_uploaded_and_no_other(
        example: Cluster, farm: sshfarm.Farm) -> None:
    """A SIGKILLed deploy cannot remove its uploaded temporaries; the next one removes those beside its files.

    Kept: the temporary of a deploy still running here, one of another machine (its pid means nothing here), and
    one of a file the recipe does not write."""
    assert not _run(example, farm, full=False, vms=("db",)).failed
    planted: dict[str, str] = {}

    def left() -> set[str]:
        return {what for what, name in planted.items() if (farm.root("db") / name.lstrip("/")).exists()}

    killed = _runs_naming_temporaries(["/etc/motd", "/etc/hosts", "/etc/passwd"])
    running = _runs_naming_temporaries(["/etc/motd"])
    try:
        assert killed.stdout is not None and running.stdout is not None
        motd, hosts, passwd = killed.stdout.readline().split()
        killed.kill()  # SIGKILL, as mid-upload: nothing of it runs to remove its files
        killed.wait()
        planted.update({"killed motd": motd, "killed hosts": hosts, "running": running.stdout.readline().strip(),
                        "elsewhere": motd.replace(f".{socket.gethostname()}-", ".workstation2-"),
                        "other file": passwd})
        assert ".workstation2-" in planted["elsewhere"] and len(set(planted.values())) == 5, planted
        for name in planted.values():
            (farm.root("db") / name.lstrip("/")).write_bytes(b"half an upload")
        dry = _run(example, farm, full=False, vms=("db",), dry_run=True)
        assert ([r.line() for r in dry.reports], left()) == (["db: would change 0 file(s)"], set(planted))
        report = _run(example, farm, full=False, vms=("db",))
        assert [r.line() for r in report.reports] == ["db: done (0 file(s) changed)"]  # the line says nothing more
        assert left() == {"running", "elsewhere", "other file"}
    finally:
        for process in (killed, running):
            process.kill()
            process.wait()
        for name in planted.values():
            (farm.root("db") / name.lstrip("/")).unlink(missing_ok=True)


def test_changed_host_key_is_refused_naming_the_vm(example: Cluster, farm: sshfarm.Farm) -> None:
    target = resolve("web", farm.ssh_config)
    host = f"[{target.hostname}]:{target.port}"
    original = farm.known_hosts.read_text()
    forged = "AAAAC3NzaC1lZDI1NTE5AAAAIBFvq3ekr8hCxWn5tLCX6TfvWO5w8VFtOr3kRxK9Vp3m"
    lines = [f"{host} ssh-ed25519 {forged}" if line.startswith(host + " ") else line for line in original.splitlines()]
    farm.known_hosts.write_text("\n".join(lines) + "\n")
    try:
        with pytest.raises(RemoteError, match=r"web: its SSH host key CHANGED .*invoke keyscan --vm web --accept-chan"):
            connect(target)
        with pytest.raises(KeyscanFailed, match=r"^keyscan FAILED for 1 of 1 VM\(s\), their keys not recorded: web\n"
                                                r"  web: host key \(ssh-ed25519\) of .* CHANGED .*--accept-changed"):
            keyscan(["web"], farm.ssh_config)
        assert keyscan(["web"], farm.ssh_config, accept_changed=True) == [f"web: replaced changed key(s) of {host}"]
        assert sorted(farm.known_hosts.read_text().splitlines()) == sorted(original.splitlines())
    finally:
        farm.known_hosts.write_text(original)
    with connect(target) as conn:
        assert conn.run("true", hide=True, in_stream=False).ok


def test_keyscan_records_the_reachable_vms_as_it_goes_and_names_the_others(
        example: Cluster, farm: sshfarm.Farm, tmp_path: Path) -> None:
    # mcp and db are TCP listeners that never speak SSH (ssh-keyscan waits for them), ldap a refused port.
    known = tmp_path / "known_hosts"
    config = farm.ssh_config.read_text().replace(str(farm.known_hosts), str(known))
    silent = {"mcp": socket.socket(), "db": socket.socket()}
    refused = socket.socket()
    with silent["mcp"], silent["db"], refused:
        for listener in silent.values():
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            listener.settimeout(30)  # a test that hangs in accept() fails instead
        refused.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        ports = {vm: sock.getsockname()[1] for vm, sock in (*silent.items(), ("ldap", refused))}
        for vm, port in ports.items():
            config = config.replace("HostName {}\n    Port {}\n".format(*farm.addresses[vm]),
                                    f"HostName 127.0.0.1\n    Port {port}\n")
        (tmp_path / "ssh_config").write_text(config)
        env = {**os.environ, "KVMCONF_SSH_CONFIG": str(tmp_path / "ssh_config")}
        proc = subprocess.Popen([".venv/bin/invoke", "keyscan", "--vm", "web", "--vm", "ldap", "--vm", "mcp",
                                 "--vm", "db", "--vm", "provision"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            # In cluster.conf order. provision's line is out while mcp is still being scanned: a line per VM as
            # it goes, not all at the end.
            assert proc.stdout.readline() == "provision: recorded key(s) of [{}]:{}\n".format(
                *farm.addresses["provision"])
            # mcp's and db's ssh-keyscans are both connected and still waiting (no EOF yet): the VMs are scanned
            # at the same time, not one after the other's timeout; and had the lines come only at the end, their
            # -T timeout would already have closed these connections.
            waiting = [listener.accept()[0] for listener in silent.values()]
            for connection in waiting:
                with connection:
                    # Closed with a zero linger it is reset, as closing the listener resets a connection not
                    # accepted: the scan then fails at once, and quietly ("no answer"), not at ssh-keyscan's timeout.
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    # Blocking, so MSG_DONTWAIT, not a timeout, decides: no data yet is BlockingIOError.
                    connection.setblocking(True)
                    with pytest.raises(BlockingIOError):
                        connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    assert proc.poll() is None
        finally:
            for listener in silent.values():  # if the test failed before accept(): resets the waiting scan, as above
                listener.close()
            out, err = proc.communicate(timeout=120)
    assert out == (f"mcp: FAILED: no host key from 127.0.0.1:{ports['mcp']} (no answer)\n"
                   f"ldap: FAILED: no host key from 127.0.0.1:{ports['ldap']} (no answer)\n"
                   f"db: FAILED: no host key from 127.0.0.1:{ports['db']} (no answer)\n"
                   "web: recorded key(s) of [{}]:{}\n".format(*farm.addresses["web"]))
    assert proc.returncode == 1
    assert err == ("kvmconf: keyscan FAILED for 3 of 5 VM(s), their keys not recorded: mcp, ldap, db\n"
                   f"  mcp: no host key from 127.0.0.1:{ports['mcp']} (no answer)\n"
                   f"  ldap: no host key from 127.0.0.1:{ports['ldap']} (no answer)\n"
                   f"  db: no host key from 127.0.0.1:{ports['db']} (no answer)\n")
    # The reachable VMs' keys are recorded, as the farm's own keyscan recorded them.
    hosts = {"[{}]:{}".format(*farm.addresses[vm]) for vm in ("provision", "web")}
    recorded = [line for line in farm.known_hosts.read_text().splitlines() if line.split()[0] in hosts]
    assert sorted(known.read_text().splitlines()) == sorted(recorded) != []


def test_a_login_that_is_not_root_is_refused_before_anything_is_done(example: Cluster, farm: sshfarm.Farm,
                                                                     tmp_path: Path) -> None:
    """accounts.ssh_user = "deploy" makes the ssh config log in as deploy: apt-get, the pushes into /etc and the
    reloads would each fail on the VM, after the first ones had been done."""
    config = tmp_path / "ssh_config"
    config.write_text(farm.ssh_config.read_text().replace("User root", "User deploy"))
    farm.clear_logs()
    report = run_cluster(example, ["db"], True, Options(config, 1, False, None))
    [db] = report.reports
    assert (db.failed_step, db.error) == ("connect", "the ssh config logs in as 'deploy': deploy and update-confs"
                                          " install packages, write system files and reload services as root"
                                          " (expected User root: site.toml accounts.ssh_user = \"root\" makes the"
                                          " generated ssh config say so)")
    assert farm.log("db", "apt-get") == [] and farm.log("db", "systemctl") == []


def test_unknown_host_key_is_refused(example: Cluster, farm: sshfarm.Farm, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(farm.ssh_config.read_text().replace(str(farm.known_hosts), str(tmp_path / "empty")))
    with pytest.raises(RemoteError, match=r"db: host key unknown .* `invoke keyscan --vm db`"):
        connect(resolve("db", config))


def _ssh_threads_and_sockets() -> tuple[frozenset[threading.Thread], frozenset[str]]:
    """paramiko's transport threads alive in this process, and its open sockets (by inode)."""
    threads = frozenset(t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_alive())
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor is gone by now
            if (target := os.readlink(f"/proc/self/fd/{fd}")).startswith("socket:"):
                sockets.add(target)
    return threads, frozenset(sockets)


def _none_added(before: tuple[frozenset[threading.Thread], frozenset[str]]) -> bool:
    # A subset, not equality: an earlier test's transport may still be ending while this one runs.
    threads, sockets = _ssh_threads_and_sockets()
    return threads <= before[0] and sockets <= before[1]


def test_a_failed_connect_leaves_no_thread_or_socket_behind(farm: sshfarm.Farm, tmp_path: Path) -> None:
    # Refused after the SSH transport is up: an unknown host key, then a key the VM does not authorize.
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    unknown, stranger = tmp_path / "unknown_config", tmp_path / "stranger_config"
    unknown.write_text(farm.ssh_config.read_text().replace(str(farm.known_hosts), str(tmp_path / "empty")))
    stranger.write_text(farm.ssh_config.read_text().replace(str(farm.base / "client_key"), str(tmp_path / "stranger")))
    before = _ssh_threads_and_sockets()
    for _ in range(3):
        with pytest.raises(RemoteError, match=r"^db: host key unknown "):
            connect(resolve("db", unknown))
        with pytest.raises(RemoteError, match=r"^db: ssh to root@127\.0\.0\.\d+:\d+: Authentication failed"):
            connect(resolve("db", stranger))
    # Closing asks the transport thread to stop; it ends within moments, not at exit.
    deadline = time.monotonic() + 5
    while not _none_added(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _none_added(before), (before, _ssh_threads_and_sockets())


def test_names_cannot_inject_shell(example: Cluster, farm: sshfarm.Farm, hosts_copy: Path) -> None:
    # Quoting: a word with shell syntax arrives as that one word.
    with connect(resolve("scratch", farm.ssh_config)) as conn:
        word = "$(touch /pwned); `id` 'x' \"y\" * ;"
        assert conn.run(command("printf", "%s", word), hide=True, in_stream=False).stdout == word
        assert conn.run(script('printf "%s|" "$@"', word, "b c"), hide=True, in_stream=False).stdout == f"{word}|b c|"
    assert not (farm.upper("scratch") / "pwned").exists()
    # Recipes are checked before anything runs: a dest or service with shell syntax is refused.
    recipe = hosts_copy / "ldap/recipe.toml"
    line = recipe.read_text().count("\n") + 3  # that of the dest below
    recipe.write_text(recipe.read_text() + '\n[[file]]\ndest = "/etc/x;touch /pwned"\ntemplate = "recipe.toml"\n')
    with pytest.raises(RecipeError) as err:
        _run(example, farm, full=False, recipe_dir=hosts_copy)
    assert str(err.value) == (f"{recipe}:{line}:1: key 'file.dest': '/etc/x;touch /pwned' is not an"
                              " absolute path on the VM (expected / then letters, digits and . _ @ + / -, without ..)")
    assert PurePosixPath("/etc/x;touch /pwned").is_absolute()


def test_command_line_tasks(example: Cluster, farm: sshfarm.Farm, tmp_path: Path) -> None:
    # The tasks find the ssh config where `make` puts it: ssh/config in $KVMCONF_BUILD.
    (tmp_path / "ssh").mkdir()
    shutil.copy(farm.ssh_config, tmp_path / "ssh/config")
    scan = subprocess.run([".venv/bin/invoke", "keyscan", "--vm", "db", "--vm", "web"], capture_output=True,
                          env={**os.environ, "KVMCONF_BUILD": str(tmp_path)}, text=True, check=False, timeout=120)
    assert (scan.returncode, scan.stdout) == (0, "db: known\nweb: known\n"), scan.stderr
    env = {**os.environ, "KVMCONF_SSH_CONFIG": str(farm.ssh_config)}
    assert not _run(example, farm, full=False).failed
    fab = subprocess.run([".venv/bin/fab", "update-confs", "--vm", "provision", "--dry-run"], env=env,
                         capture_output=True, text=True, check=False, timeout=120)
    assert fab.returncode == 0, fab.stderr
    assert fab.stdout == "provision: would change 0 file(s)\n(dry run: nothing changed)\n" \
                         "update-confs: 1 VM(s), 0 failed\n"
    bad = subprocess.run([".venv/bin/fab", "deploy", "--vm", "nosuchvm"], env=env, capture_output=True, text=True,
                         check=False, timeout=120)
    assert (bad.returncode, bad.stderr) == (2, "kvmconf: 'nosuchvm' is not a VM of cluster.conf; expected one of:"
                                               " provision, mcp, ldap, db, web, ... (8 in all; `invoke status` lists"
                                               " them)\n")
    # A usage error exits 2, as with invoke (both tasks files share kvmconf.cli.user_errors).
    usage = subprocess.run([".venv/bin/fab", "update-confs"], env={**env, "KVMCONF_CLUSTER": "/nonexistent"},
                           capture_output=True, text=True, check=False, timeout=120)
    assert (usage.returncode, usage.stderr) == (2, "kvmconf: /nonexistent: no such file (give the inventory with"
                                                   " --cluster, CLUSTER=... or KVMCONF_CLUSTER)\n")


def test_a_vm_waits_for_what_an_unselected_vm_it_is_after_depends_on(example: Cluster, farm: sshfarm.Farm) -> None:
    # db is after ldap, which is after provision: `--vm provision --vm db --parallel 4` deployed both at once, as
    # if ldap, not chosen, cut the chain; one by one (cluster.conf order) db came after provision.
    assert [[vm.name for vm in wave] for wave in waves([example.vm("provision"), example.vm("db")], example.vms)] \
        == [["provision"], ["db"]]
    report = _run(example, farm, full=True, vms=("provision", "db"))
    assert not report.failed, "\n".join(r.line() for r in report.failed)
    times = {(vm, kind): t for t, vm, kind in report.events}
    assert times["provision", "end"] <= times["db", "start"]


@pytest.mark.parametrize(("options", "reason"), [("size=8k", "No space left on device"),
                                                 ("size=8k,ro", "Read-only file system")])
def test_an_upload_that_fails_names_the_file_and_why(example: Cluster, farm: sshfarm.Farm, hosts_copy: Path,
                                                    options: str, reason: str) -> None:
    # SFTP's answer was the whole line: "OSError: size mismatch in put!  8192 != 200000" for a full file system,
    # "OSError: Failure" for a read-only one; neither named the file, nor what to free or remount.
    (hosts_copy / "db").mkdir()
    (hosts_copy / "db/big.j2").write_text("x" * 200_000)
    (hosts_copy / "db/recipe.toml").write_text('[[file]]\ndest = "/etc/kvmconf-test-small/big.conf"\n'
                                               'template = "big.j2"\n')
    small = farm.root("db") / "etc/kvmconf-test-small"
    small.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(small)], check=True)
        try:
            report = _run(example, farm, full=False, recipe_dir=hosts_copy, vms=("db",))
            assert [r.line() for r in report.reports] == [
                f"db: FAILED at files: uploading /etc/kvmconf-test-small/big.conf: {reason}"]
            assert list(small.iterdir()) == []  # the temporary is removed
        finally:
            subprocess.run(["umount", str(small)], check=True)
    finally:
        small.rmdir()


def test_update_confs_run_from_hosts_or_given_the_cluster_by_its_full_path_changes_nothing(
        example: Cluster, farm: sshfarm.Farm) -> None:
    # The banner of a pushed file named cluster.conf and site.toml as their paths were given: run from hosts/
    # (../cluster.conf) or with KVMCONF_CLUSTER=/root/kvmconf/cluster.conf, every VM's /etc/hosts and mcp's
    # nagios files (of build/) differed, were pushed again, nagios reloaded, and all pushed back from the top.
    assert not _run(example, farm, full=False, vms=("mcp", "db")).failed
    fab = str(Path(".venv/bin/fab").absolute())
    env = {**os.environ, "KVMCONF_SSH_CONFIG": str(farm.ssh_config)}
    for cwd, variables in [("hosts", {}), (".", {"KVMCONF_CLUSTER": str(Path("cluster.conf").absolute())})]:
        run = subprocess.run([fab, "update-confs", "--vm", "mcp", "--vm", "db"], cwd=cwd, env={**env, **variables},
                             capture_output=True, text=True, check=False, timeout=120)
        assert (run.returncode, run.stdout) == (0, "mcp: done (0 file(s) changed)\ndb: done (0 file(s) changed)\n"
                                                   "update-confs: 2 VM(s), 0 failed\n"), (cwd, variables, run.stderr)


def test_ctrl_c_says_at_once_which_vm_it_lets_end_and_starts_no_other(example: Cluster, farm: sshfarm.Farm,
                                                                      hosts_copy: Path) -> None:
    # Ctrl-C while ldap's hook ran said nothing until the hook had ended, however long that took; then only
    # "kvmconf: interrupted", without the summary naming the VMs never started.
    started, go = farm.root("ldap") / "tmp/kvmconf-test-started", farm.root("ldap") / "tmp/kvmconf-test-go"
    started.unlink(missing_ok=True)
    go.unlink(missing_ok=True)
    (hosts_copy / "ldap/hooks").mkdir()
    (hosts_copy / "ldap/hooks/wait.sh").write_text(
        "#!/bin/sh\ntouch /tmp/kvmconf-test-started\nuntil [ -e /tmp/kvmconf-test-go ]; do sleep 0.1; done\n")
    recipe = hosts_copy / "ldap/recipe.toml"
    recipe.write_text('hooks = ["hooks/wait.sh"]\n' + recipe.read_text())
    env = {**os.environ, "KVMCONF_SSH_CONFIG": str(farm.ssh_config), "KVMCONF_RECIPES": str(hosts_copy)}
    proc = subprocess.Popen([".venv/bin/fab", "deploy", "--vm", "provision", "--vm", "ldap", "--vm", "db"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = threading.Timer(30, go.touch)  # so a run that says nothing until the hook ends, ends
    deadline.start()
    try:
        end = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert started.exists(), "ldap's hook never started"
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        notice = proc.stderr.readline()
        assert not go.exists(), "the Ctrl-C was answered only once ldap's hook had ended"
        assert notice == ("kvmconf: interrupted: letting ldap end (stopped midway, an apt-get or a hook would be left"
                          " half done; Ctrl-\\ stops at once all the same); no other VM is started\n")
    finally:
        deadline.cancel()
        go.touch()
        out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (1, "kvmconf: interrupted\n")
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["provision", "ldap", "deploy"]
    assert lines[1].startswith("ldap: done (") and lines[1].endswith("; 1 hook(s) run)"), lines
    assert lines[2] == "deploy: 2 VM(s), 0 failed; not started (interrupted): db"
    started.unlink()
    go.unlink()


def test_a_vm_the_ssh_config_does_not_name_fails_at_connect_saying_to_run_make(example: Cluster, farm: sshfarm.Farm,
                                                                                tmp_path: Path) -> None:
    # A VM added to cluster.conf and provisioned (which needs no `make`) is not in build/ssh/config yet: ssh took its
    # name for the address, and the line only read "ssh to scratch:22: [Errno -2] Name or service not known".
    config = tmp_path / "ssh_config"
    config.write_text("\n\n".join(block for block in farm.ssh_config.read_text().split("\n\n")
                                  if not block.startswith("Host scratch\n")))
    report = run_cluster(example, ["db", "scratch"], False, Options(config, 1, False, None))
    db, scratch = report.reports
    assert db.line().startswith("db: done ("), db.line()
    assert scratch.failed_step == "connect"
    assert scratch.line().startswith("scratch: FAILED at connect: ssh to scratch:22: "), scratch.line()
    assert scratch.line().endswith(f" ({config} gives no HostName for scratch: if `make` wrote it, it predates this"
                                   " VM: run `make` again)"), scratch.line()


def test_a_hook_that_asks_gets_no_answer_instead_of_waiting_forever(example: Cluster, farm: sshfarm.Farm,
                                                                   hosts_copy: Path) -> None:
    # Fabric left the remote stdin open: a command that asks (ssh-keygen over an existing key; in apt-get, a dpkg
    # conffile prompt) waited for an answer that never came, and the deploy with it, Ctrl-C or not.
    (hosts_copy / "ldap/hooks").mkdir()
    (hosts_copy / "ldap/hooks/ask.sh").write_text(
        "#!/bin/sh\nprintf 'Overwrite (y/n)? '\nif read -r answer; then echo \"answered $answer\" >&2; exit 1; fi\n"
        "echo 'no answer' >&2\nexit 4\n")
    recipe = hosts_copy / "ldap/recipe.toml"
    recipe.write_text('hooks = ["hooks/ask.sh"]\n' + recipe.read_text())
    env = {**os.environ, "KVMCONF_SSH_CONFIG": str(farm.ssh_config), "KVMCONF_RECIPES": str(hosts_copy)}
    fab = subprocess.run([".venv/bin/fab", "deploy", "--vm", "ldap"], env=env, capture_output=True, text=True,
                         check=False, timeout=60)
    assert fab.returncode == 1, fab.stderr
    assert fab.stdout.splitlines()[0] == "ldap: FAILED at hook ldap/hooks/ask.sh: exit 4: no answer"


@contextlib.contextmanager
def _probe_package(farm: sshfarm.Farm, tmp_path: Path, vm: str = "db") -> Iterator[Path]:
    """The package kvmconf-probe (one conffile, /etc/kvmconf-probe.conf), installable on `vm` by the real apt-get and
    dpkg: its stub apt-get is given the package's file for its name, as the VM has no repository that holds it.
    Yields the VM's root; the package is purged afterwards."""
    package = tmp_path / "package"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "etc").mkdir()
    (package / "DEBIAN/control").write_text("Package: kvmconf-probe\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: kvmconf tests <root@localhost>\nDescription: one conffile\n")
    (package / "DEBIAN/conffiles").write_text("/etc/kvmconf-probe.conf\n")
    (package / "etc/kvmconf-probe.conf").write_text("the package's\n")
    root = farm.root(vm)
    subprocess.run(["dpkg-deb", "--build", str(package), str(root / "tmp/kvmconf-probe.deb")], check=True,
                   capture_output=True)
    stub = root / "usr/local/sbin/apt-get"
    working = stub.read_text()
    stub.write_text('#!/bin/sh\nfor word do shift; [ "$word" = kvmconf-probe ] && word=/tmp/kvmconf-probe.deb\n'
                    '  set -- "$@" "$word"; done\nexec /usr/bin/apt-get "$@"\n')
    try:
        yield root
    finally:
        stub.write_text(working)
        subprocess.run(["chroot", str(root), "dpkg", "--purge", "kvmconf-probe"], capture_output=True, check=False)
        for leftover in ("tmp/kvmconf-probe.deb", "etc/kvmconf-probe.conf"):
            (root / leftover).unlink(missing_ok=True)


def test_a_package_whose_conffile_update_confs_pushed_first_is_installed_keeping_that_file(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path, tmp_path: Path) -> None:
    # update-confs pushed /etc/kvmconf-probe.conf, then deploy installed its package: dpkg asked whether to replace
    # that file. With no one to answer, the deploy failed at packages ("dpkg returned an error code (1)"), run
    # after run; before stdin was /dev/null, it waited for the answer forever.
    (hosts_copy / "db").mkdir()
    (hosts_copy / "db/probe.j2").write_text("kvmconf's\n")
    (hosts_copy / "db/recipe.toml").write_text('packages = ["kvmconf-probe"]\n\n[[file]]\n'
                                               'dest = "/etc/kvmconf-probe.conf"\ntemplate = "probe.j2"\n')
    with _probe_package(farm, tmp_path) as root:
        assert not _run(example, farm, full=False, recipe_dir=hosts_copy, vms=("db",)).failed
        report = _run(example, farm, full=True, recipe_dir=hosts_copy, vms=("db",))
        assert [r.line() for r in report.reports] == [
            "db: done (1 package(s) installed; 0 file(s) changed; 0 hook(s) run)"]
        assert (root / "etc/kvmconf-probe.conf").read_text() == "kvmconf's\n"


def test_apt_get_waits_for_the_dpkg_lock_another_process_holds(
        example: Cluster, farm: sshfarm.Farm, hosts_copy: Path, tmp_path: Path) -> None:
    """A VM's first minutes: unattended-upgrades or cloud-init's own package run hold dpkg's lock. apt-get failed at
    once ("Could not get lock /var/lib/dpkg/lock-frontend"), and deploy with it; it now waits for the lock. The lock
    is held here as apt holds it (fcntl, on the VM's lock-frontend) for 3 s."""
    (hosts_copy / "db").mkdir()
    (hosts_copy / "db/recipe.toml").write_text('packages = ["kvmconf-probe"]\n')
    with _probe_package(farm, tmp_path) as root:
        with (root / "var/lib/dpkg/lock-frontend").open("w") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            threading.Timer(3, fcntl.lockf, (lock, fcntl.LOCK_UN)).start()
            started = time.monotonic()
            report = _run(example, farm, full=True, recipe_dir=hosts_copy, vms=("db",))
        assert [r.line() for r in report.reports] == [
            "db: done (1 package(s) installed; 0 file(s) changed; 0 hook(s) run)"]
        assert time.monotonic() - started >= 3  # it did wait
