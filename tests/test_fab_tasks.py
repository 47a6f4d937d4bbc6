"""`fab deploy`, `fab update-confs`, `fab kvm-setup` and `invoke keyscan` as users run them: what they check before
reaching any machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import fabfile
from generators.errors import UsageError
from generators.model import Cluster
from kvmconf.recipes import RECIPE_DIR
from kvmconf.remote import RemoteError, Target, connect
from tests.tools import ROOT


def run_task(tool: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`fab ...` or `invoke ...` from the repository, in an environment without the caller's KVMCONF_*."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}
    return subprocess.run([str(ROOT / ".venv/bin" / tool), *args], cwd=ROOT, env={**environment, **(env or {})},
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5", "", " 2", "\u0663"])  # the last: an Arabic-Indic 3
def test_parallel_must_be_a_whole_number_of_at_least_one(value: str) -> None:
    with pytest.raises(UsageError) as err:
        fabfile._parallel(value)
    assert str(err.value) == f"--parallel {value!r}: expected a whole number >= 1 (how many VMs at a time)"
    assert fabfile._parallel("1") == 1 and fabfile._parallel("12") == 12


@pytest.mark.parametrize(("task", "value"), [("deploy", "abc"), ("update-confs", "0")])
def test_a_bad_parallel_is_a_usage_error_on_the_command_line(task: str, value: str) -> None:
    # abc was a traceback from invoke's int(), 0 a silent 1.
    result = run_task("fab", task, "--parallel", value)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kvmconf: --parallel '{value}': expected a whole number >= 1 (how many VMs at a time)\n")


def test_a_valid_parallel_is_taken(tmp_path: Path) -> None:
    # It gets past the check to the next one: the inventory (none here), not --parallel.
    result = run_task("fab", "deploy", "--parallel", "12", env={"KVMCONF_CLUSTER": str(tmp_path / "none.conf")})
    assert result.returncode == 2
    assert result.stderr.startswith(f"kvmconf: {tmp_path / 'none.conf'}: no such file"), result.stderr


@pytest.mark.parametrize("task", [("fab", "deploy"), ("fab", "update-confs"), ("invoke", "keyscan")])
def test_the_vm_tasks_look_for_the_ssh_config_in_kvmconf_build(task: tuple[str, str], tmp_path: Path) -> None:
    # build/ssh/config of the repository may exist: it must not be taken when KVMCONF_BUILD says otherwise.
    result = run_task(*task, env={"KVMCONF_BUILD": str(tmp_path / "gen")})
    assert (result.returncode, result.stderr) == (1, f"kvmconf: {tmp_path}/gen/ssh/config does not exist: run `make`"
                                                     f" first (it generates the ssh config in {tmp_path}/gen/, from"
                                                     " KVMCONF_BUILD)\n")


def test_kvm_setup_reaches_the_host_through_kvmconf_ssh_config(tmp_path: Path) -> None:
    # A named ssh config that is not there is a usage error (exit 2), as a missing cluster.conf is.
    result = run_task("fab", "kvm-setup", "--host", "kvm0", env={"KVMCONF_SSH_CONFIG": str(tmp_path / "none")})
    assert (result.returncode, result.stderr) == (2, f"kvmconf: {tmp_path}/none does not exist (named by"
                                                     " KVMCONF_SSH_CONFIG)\n")
    result = run_task("fab", "kvm-setup", "--host", "kvm0", "--ssh-config", str(tmp_path / "other"),
                      env={"KVMCONF_SSH_CONFIG": str(tmp_path / "none")})
    assert (result.returncode, result.stderr) == (2, f"kvmconf: {tmp_path}/other does not exist (named by"
                                                     " --ssh-config)\n")


@pytest.mark.parametrize(("task", "named_by"), [(("fab", "deploy"), "KVMCONF_SSH_CONFIG"),
                                                (("fab", "update-confs"), "KVMCONF_SSH_CONFIG"),
                                                (("invoke", "keyscan"), "--ssh-config")])
def test_a_missing_ssh_config_file_is_a_usage_error_naming_it(task: tuple[str, str], named_by: str,
                                                              tmp_path: Path) -> None:
    missing = str(tmp_path / "nosuch")
    flag = ["--ssh-config", missing] if named_by == "--ssh-config" else []
    result = run_task(*task, "--vm", "db", *flag, env={"KVMCONF_SSH_CONFIG": missing})
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kvmconf: {missing} does not exist (named by {named_by})\n")


@pytest.mark.parametrize("args", [["-S", "{chosen}", "deploy", "--vm", "db"],
                                  ["deploy", "--vm", "db", "--ssh-config", "{chosen}"],
                                  ["--ssh-config", "{chosen}", "update-confs", "--vm", "db"],
                                  ["update-confs", "--vm", "db", "--ssh-config", "{chosen}"]])
def test_the_vm_tasks_take_the_ssh_config_given_before_or_after_the_task(args: list[str], tmp_path: Path) -> None:
    # Fabric's own -S/--ssh-config took the flag and kvmconf used $KVMCONF_SSH_CONFIG: the real VMs.
    # Loopback ports where nothing listens: the port in the failure says which config was used.
    for name, port in (("chosen", 2), ("environment", 3)):
        (tmp_path / name).write_text(f"Host db\n  HostName 127.0.0.1\n  Port {port}\n  User root\n")
    result = run_task("fab", *(a.replace("{chosen}", str(tmp_path / "chosen")) for a in args),
                      env={"KVMCONF_SSH_CONFIG": str(tmp_path / "environment")})
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("db: FAILED at connect: ssh to 127.0.0.1:2: "), result.stdout


def test_fabrics_own_ssh_config_path_setting_does_not_redirect_the_vm_tasks(tmp_path: Path) -> None:
    # ssh_config_path in ~/.fabric.yaml reached the tasks as if given with -S, over $KVMCONF_SSH_CONFIG.
    for name, port in (("fabrics", 2), ("environment", 3)):
        (tmp_path / name).write_text(f"Host db\n  HostName 127.0.0.1\n  Port {port}\n  User root\n")
    (tmp_path / ".fabric.yaml").write_text(f"ssh_config_path: {tmp_path / 'fabrics'}\n")
    result = run_task("fab", "deploy", "--vm", "db",
                      env={"HOME": str(tmp_path), "KVMCONF_SSH_CONFIG": str(tmp_path / "environment")})
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("db: FAILED at connect: ssh to 127.0.0.1:3: "), result.stdout


@pytest.mark.parametrize(("task", "instead"), [(["deploy"], "choose VMs with --vm"),
                                               (["update-confs", "--vm", "db"], "choose VMs with --vm"),
                                               (["kvm-setup", "--host", "kvm0"], "name the physical host with --host")])
def test_fabrics_hosts_flag_is_refused(task: list[str], instead: str) -> None:
    # It ran the whole task once per name given, each run on every VM, the names themselves ignored.
    result = run_task("fab", "-H", "web,db", *task)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kvmconf: fab -H/--hosts does not choose kvmconf's machines: {instead}\n")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_kvm_setup_help_is_help_not_a_host_name(flag: str) -> None:
    # --host had no default: invoke took it as positional and `--help` as its value; and -h meant --host.
    result = run_task("fab", "kvm-setup", flag)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("Usage: fab [--core-opts] kvm-setup [--options]"), result.stdout
    assert "--host=STRING         the physical host of site.toml (required)" in result.stdout


def test_kvm_setup_without_a_host_is_a_usage_error() -> None:
    result = run_task("fab", "kvm-setup", "--dry-run")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "kvmconf: name the host with --host NAME\n")


def test_a_missing_recipe_directory_is_a_usage_error_naming_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # It was taken as a directory without recipes: every VM got nothing, and the deploy said it succeeded.
    (tmp_path / "file").write_text("")
    for value, state in [(tmp_path / "nosuch", "does not exist"), (tmp_path / "file", "is not a directory")]:
        monkeypatch.setenv("KVMCONF_RECIPES", str(value))
        with pytest.raises(UsageError) as err:
            fabfile._recipe_dir()
        assert str(err.value) == f"{value} {state} (named by KVMCONF_RECIPES)"
    monkeypatch.setenv("KVMCONF_RECIPES", "")  # empty counts as unset: hosts/
    assert fabfile._recipe_dir() is None
    monkeypatch.setenv("KVMCONF_RECIPES", str(tmp_path))
    assert fabfile._recipe_dir() == tmp_path
    # On the command line: exit status 2, before the inventory is read.
    result = run_task("fab", "update-confs", env={"KVMCONF_RECIPES": str(tmp_path / "nosuch"),
                                                  "KVMCONF_CLUSTER": str(tmp_path / "none.conf")})
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kvmconf: {tmp_path}/nosuch does not exist (named by KVMCONF_RECIPES)\n")


def test_a_template_error_names_the_template_file_line_vm_and_recipe_key(tmp_path: Path) -> None:
    # The reviewer's case: recipes of $KVMCONF_RECIPES in a directory not named hosts/. The message named
    # rec/.../recipe.toml and hosts/.../motd.j2, neither of them the real file, and no line.
    recipes = Path(shutil.copytree(RECIPE_DIR, tmp_path / "rec"))
    motd = recipes / "group/linux-servers/motd.j2"
    motd.write_text(motd.read_text() + "{% if vm.name %}\nno endif\n")
    (tmp_path / "ssh_config").write_text("")  # never read: the recipes are rendered before any VM is reached
    result = run_task("fab", "deploy", "--dry-run", env={"KVMCONF_RECIPES": str(recipes),
                                                         "KVMCONF_SSH_CONFIG": str(tmp_path / "ssh_config")})
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"kvmconf: {motd}:4: Unexpected end of template. Jinja was looking for the following tags: 'elif' or"
               " 'else' or 'endif'. The innermost block that needs to be closed is 'if'. (rendering it for VM"
               f" provision; {recipes}/group/linux-servers/recipe.toml:6:1: key 'file.template')\n")


def test_a_deploy_notes_a_recipe_that_applies_to_no_vm_on_stderr(tmp_path: Path) -> None:
    recipes = Path(shutil.copytree(RECIPE_DIR, tmp_path / "rec"))
    (recipes / "mcp").rename(recipes / "mpc")
    (tmp_path / "ssh_config").write_text("")  # the run then fails at connect: the note comes before any VM
    result = run_task("fab", "update-confs", "--vm", "ldap", env={"KVMCONF_RECIPES": str(recipes),
                                                                 "KVMCONF_SSH_CONFIG": str(tmp_path / "ssh_config")})
    assert result.returncode == 1 and result.stderr.splitlines()[0] == (
        f"{recipes}/mpc/recipe.toml: note: no VM of cluster.conf is named mpc: this recipe is not deployed"), result


@pytest.fixture()
def no_ssh_server() -> Iterator[int]:
    """A port on 127.0.0.1 that takes each connection and closes it without an SSH banner, as a machine whose sshd
    is not ready yet may do. It reads the client's own banner first, so the close is always a clean end of stream
    (closing with it unread would reset the connection instead, or not, as the timing falls)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed by the test's end
                return
            with conn:
                conn.settimeout(5)
                received = b""
                while b"\n" not in received and (chunk := conn.recv(256)):
                    received += chunk

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(timeout=5)


NO_BANNER = ("no SSH banner came back: the machine may still be booting, or another service than sshd listens on that"
             " port")


def test_a_vm_without_ssh_server_fails_with_one_line_naming_it_and_no_traceback(no_ssh_server: int,
                                                                                tmp_path: Path) -> None:
    # paramiko's transport thread logged the handshake error with a traceback of ~20 lines on stderr, through
    # logging's last resort, before kvmconf's own line.
    config = tmp_path / "ssh_config"
    config.write_text(f"Host scratch\n  HostName 127.0.0.1\n  Port {no_ssh_server}\n")
    result = run_task("fab", "deploy", "--vm", "scratch", "--dry-run", env={"KVMCONF_SSH_CONFIG": str(config)})
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout.splitlines() == [
        f"scratch: FAILED at connect: ssh to root@127.0.0.1:{no_ssh_server}: {NO_BANNER}",
        "(dry run: nothing changed)", "deploy: 1 VM(s), 1 failed: scratch (connect)"]


def test_kvm_setup_of_a_host_without_ssh_server_names_the_host_and_has_no_traceback(
        no_ssh_server: int, example: Cluster, tmp_path: Path) -> None:
    address = example.site.hosts["kvm0"].address  # what kvm-setup looks up in the ssh config, sent to loopback
    assert address, "the example's kvm0 has an address, so the message names both it and kvm0"
    config = tmp_path / "ssh_config"
    config.write_text(f"Host {address}\n  HostName 127.0.0.1\n  Port {no_ssh_server}\n")
    result = run_task("fab", "kvm-setup", "--host", "kvm0", "--ssh-config", str(config), "--dry-run")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"kvmconf: kvm0: {address}: ssh to root@127.0.0.1:{no_ssh_server}: {NO_BANNER}\n")


def test_paramikos_handshake_log_still_reaches_a_handler_set_up_to_debug(no_ssh_server: int,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    # Silencing logging's last resort must not drop the records: an admin's logging.basicConfig still gets them.
    target = Target("scratch", "127.0.0.1", no_ssh_server, "root", (), "/nonexistent/known_hosts")
    with caplog.at_level("ERROR", logger="paramiko"), pytest.raises(RemoteError) as err:
        connect(target, timeout=5)
    assert str(err.value) == f"scratch: ssh to root@127.0.0.1:{no_ssh_server}: {NO_BANNER}"
    assert any(r.name == "paramiko.transport" and "Error reading SSH protocol banner" in r.getMessage()
               for r in caplog.records), caplog.records
