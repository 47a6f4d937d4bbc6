"""The generated BACKUP check run as Nagios runs it: its command line from nagios/backup.cfg, through /bin/sh, the
real check_by_ssh and a real sshd on loopback, so the state Nagios gets is the one check_by_ssh makes of the remote
command's exit status and stderr (anything on stderr: "Remote command execution failed", at least UNKNOWN)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import pwd
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from generators import nagios
from generators.model import Cluster
from kvmconf.backup.store import TIME_FORMAT
from tests.test_backup_safety import local_point
from tests.test_nagios import DEBIAN_NAGIOS_CFG, DEBIAN_OBJECTS, _state_settings
from tests.tools import ROOT, missing, require_tool, run

CHECK_BY_SSH = "/usr/lib/nagios/plugins/check_by_ssh"  # monitoring-plugins-basic, which nagios4-common depends on


@dataclasses.dataclass(frozen=True)
class Sshd:
    port: int
    ssh_options: str  # what the Nagios server's ~nagios/.ssh would hold: our key, the sshd's host key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd on 127.0.0.1 that lets root in with a key of the test's own, and takes KVMCONF_SITE from the client
    (so the remote invoke reads the test's site.toml): the physical host of a backed-up VM."""
    if os.geteuid() != 0:
        missing("the check logs in as root: its sshd needs root")
    sshd_path = require_tool("sshd")
    require_tool(CHECK_BY_SSH)
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "client"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)]).check_returncode()
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {keys / 'host'}",
        f"AuthorizedKeysFile {keys / 'client.pub'}", "PermitRootLogin prohibit-password", "UsePAM no",
        "StrictModes no", "AcceptEnv KVMCONF_SITE", f"PidFile {keys / 'sshd.pid'}"]) + "\n")
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {(keys / 'host.pub').read_text()}")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    process = subprocess.Popen([sshd_path, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        probe = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                 "UserKnownHostsFile=/dev/null", "-p", str(port), "127.0.0.1", "true"]
        deadline = time.monotonic() + 10
        while "Connection refused" in run(probe).stderr:  # any other answer (no key offered: denied) will do
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd does not answer: {process.poll()=}")
            time.sleep(0.1)
        options = (f"-F /dev/null -i {keys / 'client'} -o IdentitiesOnly=yes -o BatchMode=yes"
                   f" -o UserKnownHostsFile={keys / 'known_hosts'} -o StrictHostKeyChecking=yes")
        yield Sshd(port, options)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _command_line(cluster: Cluster) -> str:
    text = nagios.render(cluster)[PurePosixPath("nagios/backup.cfg")]
    assert isinstance(text, str)
    lines = [line.split(None, 1)[1] for line in text.splitlines() if line.strip().startswith("command_line ")]
    assert len(lines) == 1, text
    return lines[0]


def _check(cluster: Cluster, vm: str, sshd: Sshd, site: Path) -> tuple[int, str]:
    """What Nagios gets from the BACKUP check of ``vm``: its macros expanded, the command run by /bin/sh (Nagios 4
    hands a command line with shell syntax to `/bin/sh -c`). The only addition: the ssh options that stand in for
    the nagios user's ~/.ssh, and KVMCONF_SITE passed through to the remote invoke. Nagios's own escapes (`\\;`,
    `$$`) are not undone here: a checkout with `;` or `$` is _check_in_nagios's."""
    line = _command_line(cluster).replace("$ARG1$", "127.0.0.1").replace("$ARG2$", str(sshd.port))
    line = line.replace("$HOSTNAME$", vm)
    assert line.startswith(f"{CHECK_BY_SSH} "), line
    line = line.replace(CHECK_BY_SSH, f"{CHECK_BY_SSH} {sshd.ssh_options} -o SetEnv=KVMCONF_SITE={site}", 1)
    result = run(["/bin/sh", "-c", line])
    assert result.stderr == "", result.stderr  # check_by_ssh says everything on its one line
    return result.returncode, result.stdout


def _with_checkout(cluster: Cluster, checkout: Path) -> Cluster:
    backup = dataclasses.replace(cluster.site.backup, checkout=str(checkout))
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, backup=backup))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The example's site.toml with its [backup] dir in tmp_path/b (empty) and no NAS."""
    text = (ROOT / "site.toml").read_text().replace('dir = "/var/backups/kvmconf"', f'dir = "{tmp_path}/b"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("nas_dir ="))
    (tmp_path / "b").mkdir()
    path = tmp_path / "site.toml"
    path.write_text(text + "\n")
    return path


@pytest.mark.consumer
@pytest.mark.services
def test_the_check_reports_the_backup_state_through_check_by_ssh(example: Cluster, sshd: Sshd, site: Path) -> None:
    if not (ROOT / ".venv/bin/invoke").exists():
        missing("the check runs the checkout's .venv/bin/invoke: run `make` first")
    cluster = _with_checkout(example, ROOT)
    assert _check(cluster, "provision", sshd, site) == (
        2, "BACKUP CRITICAL - provision: no backup (limit 26.0 h) | provision_age=U;;93600;0 provision_stored=0B;;;0"
           " provision_chain=0;;;0\n")
    point = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime(TIME_FORMAT)
    local_point(site.parent / "b", "provision", point)
    code, output = _check(cluster, "provision", sshd, site)
    assert (code, output.split(" | ")[0]) == (0, "BACKUP OK - provision 1.0 h"), output


@pytest.mark.consumer
@pytest.mark.services
def test_a_missing_checkout_is_unknown_not_a_backup_warning(example: Cluster, sshd: Sshd, site: Path,
                                                           tmp_path: Path) -> None:
    """A moved checkout (or a wrong [backup] checkout) says nothing about the backups: the check itself failed.
    `cd` failing exits 1 in bash and 2 in dash, which check_by_ssh passed on as WARNING or CRITICAL."""
    gone = tmp_path / "gone"
    shell = pwd.getpwnam("root").pw_shell  # sshd runs the remote command with root's login shell, named by its base
    said = run([Path(shell).name, "-c", f"cd {gone}"], executable=shell).stderr.strip()  # that shell's own words
    assert said and str(gone) in said, said
    assert _check(_with_checkout(example, gone), "provision", sshd, site) == (
        3, f"Remote command execution failed: {said}\n")


# --- the command line as nagios4 itself reads and runs it ------------------------------------------------------------


def _status(status_dat: str, vm: str) -> dict[str, str]:
    """The BACKUP service's block of status.dat, as key -> value."""
    for block in status_dat.split("servicestatus {")[1:]:
        fields = dict(line.strip().split("=", 1) for line in block.split("}")[0].strip().splitlines())
        if (fields["host_name"], fields["service_description"]) == (vm, "BACKUP"):
            return fields
    raise AssertionError(f"no BACKUP service of {vm} in status.dat")


def _check_in_nagios(cluster: Cluster, vm: str, sshd: Sshd, site: Path, tmp_path: Path) -> tuple[int, str]:
    """The state and plugin output of one forced BACKUP check run by a real nagios4: see _nagios_status."""
    fields = _nagios_status(cluster, vm, sshd, site, tmp_path)
    return int(fields["current_state"]), fields["plugin_output"]


def _nagios_status(cluster: Cluster, vm: str, sshd: Sshd, site: Path, tmp_path: Path) -> dict[str, str]:
    """The BACKUP service's status.dat entry after one forced check, run by a real nagios4 from the generated objects
    (with Debian's commands and timeperiods): its object parser, its macros and its way of running the command line."""
    host = cluster.site.hosts[cluster.vm(vm).host]  # at our sshd: its address here, its port below
    hosts = {**cluster.site.hosts, host.name: dataclasses.replace(host, address="127.0.0.1")}
    cluster = dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts))
    objects = tmp_path / "objects"
    objects.mkdir()
    for path, content in nagios.render(cluster).items():
        assert isinstance(content, str)
        if path.name == "backup.cfg":  # the stand-in for the nagios user's ~/.ssh, as in _check, and sshd's port
            target = "kvmconf-check-backup!127.0.0.1!"
            assert f" {CHECK_BY_SSH} -H " in content and f"{target}22\n" in content, content
            content = content.replace(CHECK_BY_SSH, f"{CHECK_BY_SSH} {sshd.ssh_options} -o SetEnv=KVMCONF_SITE={site}")
            content = content.replace(f"{target}22\n", f"{target}{sshd.port}\n")
        (objects / path.name).write_text(content)
    state = tmp_path / "var"
    cfg = tmp_path / "nagios.cfg"
    cfg.write_text("\n".join([
        *DEBIAN_OBJECTS, f"cfg_dir={objects}", *_state_settings(tmp_path),
        f"query_socket={state / 'nagios.qh'}",  # else /var/lib/nagios4/rw, the system's nagios's
        # Only the forced check runs (a forced check runs whatever these say), and nothing is mailed.
        "execute_service_checks=0", "execute_host_checks=0", "enable_notifications=0",
        "check_external_commands=1", "check_result_reaper_frequency=1", "status_update_interval=1"]) + "\n")
    process = subprocess.Popen([require_tool("nagios4"), str(cfg)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (state / "nagios.cmd").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nagios4 did not start: {process.poll()=}; {(state / 'nagios.log').read_text()}")
            time.sleep(0.1)
        now = int(time.time())
        with (state / "nagios.cmd").open("w") as commands:
            commands.write(f"[{now}] SCHEDULE_FORCED_SVC_CHECK;{vm};BACKUP;{now}\n")
        while True:
            status = state / "status.dat"
            fields = _status(status.read_text(), vm) if status.exists() else {"has_been_checked": "0"}
            if fields["has_been_checked"] == "1":
                return fields
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nagios4 ran no check: {process.poll()=}; {(state / 'nagios.log').read_text()}")
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.consumer
@pytest.mark.services
def test_nagios_reads_the_checks_state_output_and_perfdata(example: Cluster, sshd: Sshd, site: Path,
                                                           tmp_path: Path) -> None:
    if not (ROOT / ".venv/bin/invoke").exists():
        missing("the check runs the checkout's .venv/bin/invoke: run `make` first")
    point = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime(TIME_FORMAT)
    local_point(site.parent / "b", "provision", point)
    fields = _nagios_status(_with_checkout(example, ROOT), "provision", sshd, site, tmp_path)
    assert (fields["current_state"], fields["plugin_output"]) == ("0", "BACKUP OK - provision 1.0 h"), fields
    assert re.fullmatch(r"provision_age=36\d\ds;;93600;0 provision_stored=6B;;;0 provision_chain=1;;;0",
                        fields["performance_data"]), fields


@pytest.mark.consumer
@pytest.mark.services
@pytest.mark.parametrize("name", ["kvm;conf", "it's", "$HOME", 'a"b', "back\\slash;", "a\\;b", "`id`"])
def test_nagios_hands_the_checkout_to_the_hosts_shell_unchanged(example: Cluster, sshd: Sshd, site: Path,
                                                                tmp_path: Path, name: str) -> None:
    """site.toml takes any absolute path without whitespace: in the object file `;` starts a comment and `$` a macro,
    and the command line goes through the Nagios server's /bin/sh before the host's shell reads it."""
    gone = tmp_path / name / "kvmconf"  # not there: the host's shell says the path it got
    shell = pwd.getpwnam("root").pw_shell
    said = run([Path(shell).name, "-c", f"cd {shlex.quote(str(gone))}"], executable=shell).stderr.strip()
    assert said.endswith(f"{gone}: No such file or directory"), said
    # Nagios shows a ";" of a plugin's output as ":" (in status.dat and everywhere after it).
    assert _check_in_nagios(_with_checkout(example, gone), "provision", sshd, site, tmp_path) == (
        3, f"Remote command execution failed: {said}".replace(";", ":"))


@pytest.mark.consumer
def test_check_by_ssh_gives_up_before_debians_nagios_kills_the_check(example: Cluster) -> None:
    """Nagios kills a check after service_check_timeout (60 s in Debian's nagios.cfg): a -t above it never applied,
    and the admin read "(Service check timed out after 60.00 seconds)" instead of check_by_ssh's own message."""
    if not DEBIAN_NAGIOS_CFG.exists():
        missing(f"{DEBIAN_NAGIOS_CFG} is not there (make test-deps installs nagios4)")
    settings = dict(line.split("=", 1) for line in DEBIAN_NAGIOS_CFG.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    timeout = re.search(r" -t (\d+) ", _command_line(example))
    assert timeout is not None, _command_line(example)
    assert int(timeout[1]) < int(settings["service_check_timeout"]), (timeout[0], settings["service_check_timeout"])
