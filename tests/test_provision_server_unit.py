"""The provision server without a lab: install marks, the HTTP server on loopback, the reload decisions."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath

import pytest

from generators.model import Cluster
from generators.writer import STAMP
from kvmconf import dnsmasq_control, install_http, lab, provision_server, provision_state, tftp_tree
from kvmconf.dnsmasq_control import Dnsmasq
from kvmconf.errors import KvmconfError
from kvmconf.install_http import ProvisionHTTPServer
from kvmconf.processes import output_of, stop_pid
from tests import sshfarm
from tests.tools import missing, require_tool

MCP_ENTRY = "pxelinux.cfg/01-52-54-00-50-00-03"  # mcp: install=pxe, boot=bios in the example


class FakeDnsmasq(Dnsmasq):
    """Records reloads and restarts instead of signalling a process."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp / "dnsmasq.pid", self._start)
        self.calls: list[str] = []
        self.running = False

    def _start(self, conf: Path) -> None:
        self.calls.append(f"start {conf.name}")
        self.running = True

    def pid(self) -> int | None:
        return 4242 if self.running else None

    def reload(self) -> None:
        self.calls.append("reload")

    def restart(self, conf: Path) -> None:
        if self.running:
            self.calls.append("stop")
        self._start(conf)


def test_a_vms_boot_entries_are_its_per_mac_files_for_both_loaders(example: Cluster, tmp_path: Path) -> None:
    provision_server.stage_build(example, tmp_path)
    assert provision_state.boot_entries(tmp_path, "web") == [
        "pxelinux.cfg/01-52-54-00-50-00-21", "grub/grub.cfg-01-52-54-00-50-00-21", "grub/grub.cfg-52-54-00-50-00-21",
        "grub/grub.cfg-52:54:00:50:00:21"]
    assert provision_state.boot_entries(tmp_path, "nosuch") == []
    # The stale-entry clean-up recognises every name, and the build has exactly the names of its loader.
    from generators.pxe import PER_MAC_ENTRY

    assert all(PER_MAC_ENTRY.fullmatch(name) for name in provision_state.boot_entries(tmp_path, "web"))
    tftp = tmp_path / "build/tftp"
    built = {str(p.relative_to(tftp)) for p in tftp.rglob("*-52?54?00?50?00?21")}
    assert built == set(provision_state.boot_entries(tmp_path, "web")[1:])  # web boots UEFI: its GRUB names


def test_the_server_builds_into_the_one_build_dir_it_reads_from(example: Cluster, tmp_path: Path) -> None:
    # config_dir/build as the module's layout says; stage_build writes where boot_entries, dnsmasq and HTTP read.
    assert provision_server.stage_build(example, tmp_path) == provision_state.build_dir_in(tmp_path) \
        == tmp_path / "build"
    assert (tmp_path / "build/dnsmasq/dnsmasq.conf").is_file() and (tmp_path / "build/preseed/ldap.cfg").is_file()


def test_the_installed_state_round_trips_sorted(tmp_path: Path) -> None:
    assert provision_state.read_installed(tmp_path) == set()
    provision_state.write_installed(tmp_path, ["web", "mcp", "web"])
    assert (tmp_path / "installed").read_text().splitlines()[1:] == ["mcp", "web"]
    assert provision_state.read_installed(tmp_path) == {"mcp", "web"}


@pytest.fixture
def served(example: Cluster, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    build = provision_server.stage_build(example, config_dir)
    shutil.copytree(build / "tftp", tftp_root)
    server = ProvisionHTTPServer(("127.0.0.1", 0), config_dir, tftp_root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", config_dir, tftp_root
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_http_serves_each_preseed_and_seed_at_its_url_and_nothing_else(served: tuple[str, Path, Path]) -> None:
    url, config_dir, _ = served
    assert _get(f"{url}/preseed/mcp.cfg") == (200, (config_dir / "build/preseed/mcp.cfg").read_bytes())
    assert _get(f"{url}/cloud-init/login/user-data") == (200, (config_dir / "build/cloud-init/login/user-data")
                                                         .read_bytes())
    for path in ("/preseed/nosuch.cfg", "/preseed/../dnsmasq/dnsmasq.conf", "/preseed/%2e%2e/installed",
                 "/dnsmasq/dnsmasq.conf", "/build/preseed/mcp.cfg"):
        assert _get(url + path)[0] == 404, path
    log = (config_dir / install_http.HTTP_LOG).read_text().splitlines()
    assert log[0].split()[1:] == ["127.0.0.1", "GET", "/preseed/mcp.cfg", "200"]


def _raw(url: str, request: bytes) -> bytes:
    """What the server answers to ``request`` sent as is: urllib never sends a malformed one."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(("request_line", "status"), [
    (b"GARBAGE", 400), (b"GET /preseed/mcp.cfg HTTP/9.x", 400), (b"GET /" + b"a" * 70000 + b" HTTP/1.0", 414)])
def test_a_request_line_that_does_not_parse_is_answered_and_logged(
        served: tuple[str, Path, Path], request_line: bytes, status: int) -> None:
    url, config_dir, _ = served
    # It used to fail in log_request (no self.path yet): the client got no answer, and no line was logged.
    # (Without a version it understands, the stdlib answers as HTTP/0.9: the error page without a status line.)
    assert f"<p>Error code: {status}</p>".encode() in _raw(url, request_line + b"\r\n\r\n")
    assert (config_dir / install_http.HTTP_LOG).read_text().split()[1:] == ["127.0.0.1", "-", "-", str(status)]
    assert _get(f"{url}/preseed/mcp.cfg")[0] == 200  # and the server goes on


def test_an_install_mark_for_a_name_with_a_nul_byte_is_no_such_vm(served: tuple[str, Path, Path]) -> None:
    url, config_dir, tftp_root = served
    # %00 decodes to a NUL, which no path may hold: the lookup raised, and the installer's wget got no answer.
    assert _get(f"{url}/installed/mcp%00") == (404, b"no such VM\n")
    assert provision_state.read_installed(config_dir) == set() and (tftp_root / MCP_ENTRY).exists()


def test_http_url_with_a_path_is_served_under_that_path(example: Cluster, tmp_path: Path) -> None:
    base = install_http.http_base("http://192.168.50.2:8080/kvm%20conf/pxe")
    assert base == install_http.HttpBase("192.168.50.2", 8080, "/kvm%20conf/pxe")
    assert base.serve_args() == ["--bind=192.168.50.2:8080", "--prefix=/kvm%20conf/pxe"]
    assert install_http.http_base("http://192.168.50.2/").serve_args() == ["--bind=192.168.50.2:80"]
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    build = provision_server.stage_build(example, config_dir)
    shutil.copytree(build / "tftp", tftp_root)
    server = ProvisionHTTPServer(("127.0.0.1", 0), config_dir, tftp_root, base.prefix)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        # The generated preseed URL is <http_url>/preseed/<vm>.cfg: with a path, that path comes first.
        assert _get(f"{url}/kvm%20conf/pxe/preseed/mcp.cfg") == (200, (build / "preseed/mcp.cfg").read_bytes())
        assert _get(f"{url}/preseed/mcp.cfg")[0] == 404 and _get(f"{url}/kvm%20conf/preseed/mcp.cfg")[0] == 404
        assert _get(f"{url}/kvm%20conf/pxe/installed/mcp") == (200, b"installed\n")
        assert provision_state.read_installed(config_dir) == {"mcp"} and not (tftp_root / MCP_ENTRY).exists()
    finally:
        server.shutdown()
        server.server_close()


def test_the_printed_serve_command_runs_as_printed(example: Cluster, tmp_path: Path) -> None:
    """The command `invoke provision-server` prints is pasted into a shell on the provision VM: from any folder,
    without PYTHONPATH, it must start the server (a bare python3 lacks the venv's jinja2 and the checkout)."""
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    build = provision_server.stage_build(example, config_dir)
    shutil.copytree(build / "tftp", tftp_root)
    port = sshfarm.free_port()
    command = provision_server.serve_command(install_http.http_base(f"http://127.0.0.1:{port}/pxe"),
                                             str(config_dir), str(tftp_root))
    assert command.startswith(f"cd {provision_server.CHECKOUT} && {sys.executable} -m kvmconf.provision_server serve ")
    pid_file = tmp_path / "http.pid"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(["sh", "-c", f"{command} --pid-file={pid_file}"], cwd="/", env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(300):
            if pid_file.exists() or server.poll() is not None:
                break
            time.sleep(0.05)
        assert pid_file.exists(), server.communicate(timeout=10)[1]
        assert _get(f"http://127.0.0.1:{port}/pxe/preseed/mcp.cfg") == (200, (build / "preseed/mcp.cfg").read_bytes())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def _serve(config_dir: Path, tftp_root: Path, *more: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kvmconf.provision_server", "serve", f"--config-dir={config_dir}",
                             f"--bind=127.0.0.1:{sshfarm.free_port()}", f"--tftp-root={tftp_root}", *more],
                            cwd=provision_server.CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_server_stops_on_ctrl_c_or_sigterm_with_status_0_and_no_pid_file_left(
        example: Cluster, tmp_path: Path, stop: signal.Signals) -> None:
    """Ctrl-C is how the admin stops the server run as printed, SIGTERM how lab teardown does."""
    config_dir = tmp_path / "kvmconf"
    provision_server.stage_build(example, config_dir)
    pid_file = tmp_path / "http.pid"
    server = _serve(config_dir, tmp_path / "tftp", f"--pid-file={pid_file}")
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.communicate(timeout=10)
            time.sleep(0.05)
        server.send_signal(stop)
        _, err = server.communicate(timeout=10)
    finally:
        server.kill()
        server.wait(timeout=10)
    # Ctrl-C used to end in a KeyboardInterrupt traceback (status -2), and either left the pid file.
    assert (server.returncode, err) == (0, "")
    assert not pid_file.exists()


def test_the_server_refuses_a_config_dir_without_a_build(tmp_path: Path) -> None:
    # It used to start, and drop every connection unanswered: http.log, in the missing config_dir, cannot be opened.
    server = _serve(tmp_path / "nosuch", tmp_path / "tftp")
    try:
        _, err = server.communicate(timeout=30)
    finally:
        server.kill()
        server.wait(timeout=10)
    assert (server.returncode, err) == (1, f"kvmconf: {tmp_path / 'nosuch/build'} is missing: run `invoke"
                                           " provision-server` first, which builds it, and serve its --config-dir"
                                           " ([provision] config_dir)\n")


def test_the_server_on_a_port_another_holds_says_so_without_a_traceback(example: Cluster, tmp_path: Path) -> None:
    config_dir = tmp_path / "kvmconf"
    provision_server.stage_build(example, config_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = subprocess.run([sys.executable, "-m", "kvmconf.provision_server", "serve",
                                 f"--config-dir={config_dir}", f"--bind=127.0.0.1:{port}",
                                 f"--tftp-root={tmp_path / 'tftp'}"], cwd=provision_server.CHECKOUT,
                                capture_output=True, text=True, timeout=60)
    assert (server.returncode, server.stderr) == (
        1, f"kvmconf: cannot serve HTTP on 127.0.0.1:{port}: Address already in use (it must be an address of this"
           " machine and a port no other server holds: [provision] http_url names them)\n")


@pytest.mark.parametrize("http_url", ["https://192.168.50.2", "http://192.168.50.2:http", "http://192.168.50.2:99999",
                                      "http://192.168.50.2/pxe?x=1", "http://:80/"])
def test_an_http_url_the_server_cannot_serve_is_refused(http_url: str) -> None:
    with pytest.raises(KvmconfError) as refused:
        install_http.http_base(http_url)
    assert str(refused.value) == (f"[provision] http_url {http_url!r}: the provision server serves plain HTTP, so it"
                                  " must be http://host[:port][/path] (no https: a TLS proxy in front is not set up"
                                  " by kvmconf)")


def test_installed_url_removes_the_vms_boot_entry_and_reinstall_restores_it(
        served: tuple[str, Path, Path], example: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    url, config_dir, tftp_root = served
    entry = tftp_root / MCP_ENTRY
    original = entry.read_text()
    assert "LABEL install" in original
    assert _get(f"{url}/installed/mcp") == (200, b"installed\n")
    assert not entry.exists() and (tftp_root / "pxelinux.cfg/01-52-54-00-50-00-10").exists()  # ldap keeps its own
    assert provision_state.read_installed(config_dir) == {"mcp"}
    assert _get(f"{url}/installed/nosuch")[0] == 404 and provision_state.read_installed(config_dir) == {"mcp"}
    cluster = _at(example, config_dir, tftp_root)
    # A rebuild keeps the mark: the entry stays away, also while the tree is copied (right after the copy,
    # before any clean-up, an installed VM booting must not find it).
    stale_cleanup = tftp_tree._remove_stale_boot_entries
    seen_after_copy: list[bool] = []
    monkeypatch.setattr(tftp_tree, "_remove_stale_boot_entries",
                        lambda built, root: (seen_after_copy.append(entry.exists()), stale_cleanup(built, root)))
    tftp_tree.assemble_tftp(cluster, provision_server.stage_build(cluster, config_dir), tftp_root)
    assert seen_after_copy == [False] and not entry.exists()
    lines: list[str] = []
    provision_server.reinstall(cluster, "mcp", lines.append)
    assert entry.read_text() == original and provision_state.read_installed(config_dir) == set()
    assert lines == ["mcp: network install enabled again; it installs at its next PXE boot (with an empty disk)"]
    with pytest.raises(KvmconfError, match=r"login is install=cloud in cluster\.conf: only install=pxe VMs"):
        provision_server.reinstall(cluster, "login")


def test_reinstall_of_a_vm_whose_deployed_build_has_no_installer_entry_says_to_deploy(
        served: tuple[str, Path, Path], example: Cluster) -> None:
    """login is install=cloud in the build the server has; cluster.conf now says install=pxe, not deployed yet."""
    import dataclasses

    from generators.model import Install

    _, config_dir, tftp_root = served
    cluster = _at(example, config_dir, tftp_root)
    login = dataclasses.replace(cluster.vm("login"), install=Install.PXE)
    cluster = dataclasses.replace(cluster, vms=tuple(login if vm.name == "login" else vm for vm in cluster.vms))
    lines: list[str] = []
    # It used to say "login: network install enabled again; it installs at its next PXE boot", and nothing would.
    with pytest.raises(KvmconfError) as refused:
        provision_server.reinstall(cluster, "login", lines.append)
    assert str(refused.value) == (f"login has no installer entry in {config_dir / 'build/tftp'}: the provision"
                                  " server's build is from before it was install=pxe; run `invoke provision-server`")
    assert lines == []


def test_a_rebuild_removes_an_installed_vms_entry_that_an_older_deploy_left(example: Cluster, tmp_path: Path) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    tftp_tree.assemble_tftp(cluster, provision_server.stage_build(cluster, config_dir), tftp_root)
    entry = tftp_root / MCP_ENTRY
    assert entry.is_file()
    # The state says installed but the deployed entry is still there: `installed` edited by hand (or restored),
    # or a mark whose process stopped after writing the state and before removing the entry.
    provision_state.write_installed(config_dir, {"mcp"})
    tftp_tree.assemble_tftp(cluster, provision_server.stage_build(cluster, config_dir), tftp_root)
    assert not entry.exists()  # else mcp would install over itself at its next network boot
    assert (tftp_root / "pxelinux.cfg/01-52-54-00-50-00-10").is_file()  # ldap is not installed: it keeps its own


def test_an_install_mark_during_a_rebuild_waits_and_its_entry_stays_away(
        example: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    build = provision_server.stage_build(cluster, config_dir)
    tftp_tree.assemble_tftp(cluster, build, tftp_root)
    entry = tftp_root / MCP_ENTRY
    assert entry.is_file()
    # mcp's installer reports "done" after the rebuild has read the state (mcp not installed yet) and before it
    # copies the tree: the mark must wait, or the copy would put mcp's entry back and it would reinstall itself.
    copytree = shutil.copytree
    marks: list[bool] = []
    mark = threading.Thread(target=lambda: marks.append(
        tftp_tree.set_installed(config_dir, tftp_root, "mcp", True)))

    def copy_while_marked(*args: object, **kwargs: object) -> object:
        if mark.ident is None:  # the top call: copytree calls itself for each subdirectory
            mark.start()
            mark.join(timeout=0.5)
            assert mark.is_alive() and marks == []  # the mark waits for the rebuild's copy
        return copytree(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "copytree", copy_while_marked)
    tftp_tree.assemble_tftp(cluster, build, tftp_root)
    mark.join(timeout=30)
    assert marks == [True] and not entry.exists() and provision_state.read_installed(config_dir) == {"mcp"}


def test_a_tftp_read_begun_before_a_deploy_gets_the_whole_old_boot_entry(example: Cluster, tmp_path: Path) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    build = provision_server.stage_build(_at(example, config_dir, tftp_root), config_dir)
    tftp_tree.copy_boot_entries(build, tftp_root)
    entry, default = tftp_root / MCP_ENTRY, tftp_root / "pxelinux.cfg/default"
    old, default_inode = entry.read_bytes(), default.stat().st_ino
    (build / "tftp" / MCP_ENTRY).unlink()
    (build / "tftp" / MCP_ENTRY).write_bytes(old + b"# the next build's\n")
    with entry.open("rb") as reading:  # dnsmasq sending it to mcp, as the deploy copies the new one
        tftp_tree.copy_boot_entries(build, tftp_root)
        # Copied in place, the file was truncated under the reader, which got part of the new one, or nothing.
        assert reading.read() == old
    assert entry.read_bytes() == old + b"# the next build's\n" and entry.stat().st_mode & 0o777 == 0o644
    assert default.stat().st_ino == default_inode  # unchanged: not copied again
    assert [p.name for p in tftp_root.rglob(".*")] == []  # no temporary left


def test_a_failed_copy_into_the_tftp_root_leaves_no_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, root = tmp_path / "pxelinux.0", tmp_path / "tftp"
    src.write_bytes(b"loader")

    def refuse(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)  # the last step, after the temporary is complete
    with pytest.raises(OSError, match="No space left on device"):
        tftp_tree._copy_if_changed(src, root / "pxelinux.0")
    assert list(root.iterdir()) == []


def test_a_rebuild_removes_the_boot_entries_of_vms_gone_from_cluster_conf(example: Cluster, tmp_path: Path) -> None:
    import dataclasses

    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    tftp_tree.assemble_tftp(cluster, provision_server.stage_build(cluster, config_dir), tftp_root)
    # web boots UEFI (its GRUB entries), mcp BIOS (its pxelinux entry)
    web = [p for p in (tftp_root / rel for rel in provision_state.boot_entries(config_dir, "web")) if p.exists()]
    mcp = [tftp_root / MCP_ENTRY]
    assert [p.name for p in web] == ["grub.cfg-01-52-54-00-50-00-21", "grub.cfg-52-54-00-50-00-21",
                                     "grub.cfg-52:54:00:50:00:21"]
    assert mcp[0].is_file()
    (tftp_root / "pxelinux.cfg" / "default.local").write_text("not a per-MAC entry\n")
    without_web = dataclasses.replace(cluster, vms=tuple(vm for vm in cluster.vms if vm.name != "web"))
    tftp_tree.assemble_tftp(without_web, provision_server.stage_build(without_web, config_dir), tftp_root)
    assert [p for p in web if p.exists()] == []  # a machine that later boots with web's MAC gets no installer
    assert all(p.is_file() for p in mcp) and (tftp_root / "pxelinux.cfg" / "default").is_file()
    assert (tftp_root / "pxelinux.cfg" / "default.local").is_file()  # not ours to remove


def _at(cluster: Cluster, config_dir: Path, tftp_root: Path) -> Cluster:
    """The cluster with its provision server's files in tmp, and this machine as that server (loopback stands for
    its interface and address: reinstall refuses a machine without both)."""
    import dataclasses

    provision = dataclasses.replace(cluster.site.provision, config_dir=str(config_dir), tftp_root=str(tftp_root),
                                    interface="lo", server=IPv4Address("127.0.0.1"))
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, provision=provision))


# --- only on the provision server ---------------------------------------------------------------------------

def test_the_provision_server_is_where_its_interface_and_address_are(example: Cluster, netns: str) -> None:
    def refusal() -> str:
        with pytest.raises(KvmconfError) as refused:
            provision_server.require_provision_server(example, "`invoke x` changes y", netns)
        return str(refused.value)

    tail = ": `invoke x` changes y on the machine it runs on; run it on the provision server (provision), or on the" \
           " lab with KVMCONF_LAB set"
    assert refusal() == (f"the lab's namespace {netns} is not the provision server (it has no interface 'enp1s0',"
                         f" [provision] interface in site.toml){tail}")
    ip = ["ip", "-n", netns]
    subprocess.run([*ip, "link", "add", "enp1s0", "type", "veth", "peer", "name", "peer0"], check=True)
    subprocess.run([*ip, "address", "add", "192.168.50.9/24", "dev", "enp1s0"], check=True)
    assert refusal() == (f"the lab's namespace {netns} is not the provision server (the provision VM provision's"
                         f" address 192.168.50.2 is not one of its addresses: 192.168.50.9){tail}")
    subprocess.run([*ip, "address", "add", "192.168.50.2/24", "dev", "enp1s0"], check=True)
    provision_server.require_provision_server(example, "`invoke x` changes y", netns)  # no exception: it is


def _site_at(tmp_path: Path, *edits: tuple[str, str]) -> tuple[Path, Path, Path]:
    """site.toml with the provision server's files in tmp_path, and ``edits`` (old, new) made: (site, config, tftp)."""
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    text = Path("site.toml").read_text()
    for old, new in (('tftp_root = "/srv/tftp"', f'tftp_root = "{tftp_root}"'),
                     ('config_dir = "/etc/kvmconf"', f'config_dir = "{config_dir}"'), *edits):
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "site.toml").write_text(text)
    return tmp_path / "site.toml", config_dir, tftp_root


def _invoke_in_own_netns(site: Path, config_dir: Path, *args: str, setup: str = "") -> tuple[int, str]:
    """`invoke ARGS` in a network namespace of its own: (exit status, stderr); see _run_in_own_netns."""
    result = _run_in_own_netns(site, config_dir, *args, setup=setup)
    return result.returncode, result.stderr


def _run_in_own_netns(site: Path, config_dir: Path, *args: str, setup: str = "") -> subprocess.CompletedProcess[str]:
    """`invoke ARGS` in a network namespace of its own (``setup``: shell commands first).

    Nothing but loopback is there: whatever a task wrongly starts (dnsmasq) stays away from this machine's networks,
    and is stopped here.
    """
    if os.geteuid() != 0:
        missing("unshare --net needs root")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}
    env.update(KVMCONF_CLUSTER=str(Path("cluster.conf").absolute()), KVMCONF_SITE=str(site))
    try:
        return subprocess.run(["unshare", "--net", "sh", "-c", f'{setup}exec "$0" -m invoke "$@"', sys.executable,
                               *args], env=env, capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)
    finally:  # a dnsmasq it started would keep the namespace
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((config_dir / "dnsmasq.pid").read_text()), signal.SIGKILL)


@pytest.mark.parametrize(("args", "does"), [
    (("provision-server",), "`invoke provision-server` writes {config_dir} and {tftp_root} and starts dnsmasq"),
    (("reinstall", "--vm", "mcp"), "`invoke reinstall` changes {config_dir}/installed and {tftp_root}"),
])
def test_the_tasks_refuse_to_run_anywhere_but_on_the_provision_server(tmp_path: Path, args: tuple[str, ...],
                                                                       does: str) -> None:
    """A machine with nothing but loopback: a workstation, not the provision VM."""
    site, config_dir, tftp_root = _site_at(tmp_path)
    assert _invoke_in_own_netns(site, config_dir, *args) == (
        1, f"kvmconf: this machine is not the provision server (it has no interface 'enp1s0', [provision] interface"
           f" in {site}): {does.format(config_dir=config_dir, tftp_root=tftp_root)} on the machine it runs on; run"
           " it on the provision server (provision), or on the lab with KVMCONF_LAB set\n")
    assert not config_dir.exists() and not tftp_root.exists()  # nothing was written


def test_provision_server_refuses_an_https_url_before_it_changes_anything(tmp_path: Path) -> None:
    """On a machine that is the provision server: loopback, up, carries [provision] server. site.toml's own check
    refuses the URL at its line, as `make` does (install_http.http_base refuses it too, tested above)."""
    site, config_dir, tftp_root = _site_at(
        tmp_path, ('vm = "provision"', 'server = "127.0.0.1"'), ('interface = "enp1s0"', 'interface = "lo"'),
        ('http_url = "http://192.168.50.2"', 'http_url = "https://127.0.0.1"'))
    assert _invoke_in_own_netns(site, config_dir, "provision-server", setup="ip link set lo up && ") == (
        1, f"{site}:77:1: key 'provision.http_url': 'https://127.0.0.1' is not a URL the provision server can serve"
           " (expected http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)\nkvmconf: 1 problem\n")
    assert not config_dir.exists() and not tftp_root.exists()  # nothing was written


@pytest.mark.consumer
def test_deploy_starts_then_reloads_only_for_hostsfiles_and_restarts_only_for_a_checked_conf(
        example: Cluster, tmp_path: Path) -> None:
    require_tool("dnsmasq")
    config_dir = tmp_path / "kvmconf"
    provision_server.stage_build(example, config_dir)
    fake = FakeDnsmasq(tmp_path)
    assert dnsmasq_control.deploy_dnsmasq(config_dir, fake, print) == "started"
    assert dnsmasq_control.deploy_dnsmasq(config_dir, fake, print) == "unchanged"
    (config_dir / "build/dnsmasq/dhcp-hosts/newvm").write_text("52:54:00:50:00:99,192.168.50.99,newvm,infinite\n")
    assert dnsmasq_control.deploy_dnsmasq(config_dir, fake, print) == "reloaded"
    assert (config_dir / "dnsmasq/dhcp-hosts/newvm").exists()
    assert fake.calls == ["start dnsmasq.conf", "reload"]
    conf = config_dir / "build/dnsmasq/dnsmasq.conf"
    good = conf.read_text()
    conf.write_text(good + "dhcp-range=not-an-address\n")
    with pytest.raises(KvmconfError, match="dnsmasq --test rejected the new configuration; the running one stays"):
        dnsmasq_control.deploy_dnsmasq(config_dir, fake, print)
    assert (config_dir / "dnsmasq/dnsmasq.conf").read_text() == good and fake.calls == ["start dnsmasq.conf", "reload"]
    conf.write_text(good + "log-queries\n")
    assert dnsmasq_control.deploy_dnsmasq(config_dir, fake, print) == "restarted"
    assert fake.calls[-2:] == ["stop", "start dnsmasq.conf"]


# --- what a deploy may touch ------------------------------------------------------------------------------

@pytest.mark.services
def test_a_pid_file_naming_an_unrelated_process_is_not_taken_for_dnsmasq() -> None:
    """config_dir/dnsmasq.pid outlives its dnsmasq (config_dir survives a reboot): the PID may be any process's now.

    A deploy must neither signal that process nor count it as dnsmasq running; it starts its own."""
    require_tool("dnsmasq")
    # dnsmasq drops to nobody, who must reach the TFTP root: not below pytest's private (0700) tmp_path.
    served = Path(tempfile.mkdtemp(prefix="kvmconf-test-"))
    served.chmod(0o755)
    site, config_dir, _ = _site_at(served, ('vm = "provision"', 'server = "127.0.0.1"'),
                                   ('interface = "enp1s0"', 'interface = "lo"'))
    config_dir.mkdir()
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        (config_dir / "dnsmasq.pid").write_text(f"{unrelated.pid}\n")
        result = _run_in_own_netns(site, config_dir, "provision-server", setup="ip link set lo up && ")
        assert unrelated.poll() is None  # neither SIGHUP nor SIGTERM/SIGKILL reached it
        assert result.returncode == 0, result.stderr
        assert (f"provision server: {config_dir / 'dnsmasq.pid'} names PID {unrelated.pid}, which is not this"
                f" dnsmasq ('sleep 300'): left alone; no dnsmasq of ours runs\nprovision server: dnsmasq started\n"
                in result.stdout), result.stdout
        assert int((config_dir / "dnsmasq.pid").read_text()) != unrelated.pid  # its own dnsmasq wrote it
    finally:
        unrelated.kill()
        unrelated.wait(timeout=10)
        shutil.rmtree(served)


@pytest.fixture
def netns_dnsmasq(netns: str, tmp_path: Path) -> Iterator[Dnsmasq]:
    """Real dnsmasq started as the lab starts it, in a namespace with loopback up (the interface of ``_at``)."""
    require_tool("dnsmasq")
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    pid_file = tmp_path / "dnsmasq.pid"

    def start(conf: Path) -> None:
        # As root: the hostsfiles, re-read on SIGHUP, are in the test's private tmp_path.
        output_of(["ip", "netns", "exec", netns, "dnsmasq", f"--conf-file={conf}", f"--pid-file={pid_file}",
                   f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}", f"--log-facility={tmp_path / 'dnsmasq.log'}",
                   "--user=root", "--group=root"])

    dnsmasq = Dnsmasq(pid_file, start)
    yield dnsmasq
    if (pid := dnsmasq.pid()) is not None:  # it would keep the namespace
        os.kill(pid, signal.SIGKILL)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bad_render(monkeypatch: pytest.MonkeyPatch, line: str) -> None:
    """``line`` appended to the rendered dnsmasq.conf: the rest is rendered as always. A cluster that passed
    validation renders a conf dnsmasq takes, so the fault that a deploy must survive is put in here."""
    render_all = provision_server.render_all

    def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
        files = render_all(cluster)
        files[PurePosixPath("dnsmasq/dnsmasq.conf")] = str(files[PurePosixPath("dnsmasq/dnsmasq.conf")]) + line
        return files

    monkeypatch.setattr(provision_server, "render_all", render)


def _without_web(cluster: Cluster) -> Cluster:
    """The next deploy would delete web's boot entries and build files: a change that must not happen halfway."""
    import dataclasses

    return dataclasses.replace(cluster, vms=tuple(vm for vm in cluster.vms if vm.name != "web"))


@pytest.mark.services
@pytest.mark.parametrize("fault", ["dnsmasq --test rejects the conf", "the netboot package is missing"])
def test_a_deploy_that_fails_a_check_changes_nothing_the_server_serves(
        example: Cluster, tmp_path: Path, netns_dnsmasq: Dnsmasq, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    assert provision_server.deploy(cluster, netns_dnsmasq, print) == "started"
    pid, before = netns_dnsmasq.pid(), (_tree(config_dir), _tree(tftp_root))
    if fault == "dnsmasq --test rejects the conf":
        _bad_render(monkeypatch, "dhcp-range=not-an-address\n")
        expected = (r"dnsmasq --test rejected the new configuration; the running one stays: dnsmasq: bad dhcp-range at"
                    r" line \d+ of \S+/dnsmasq-check\.conf")
    else:
        # Where the package would put its tree: not installed (the machine's real one stays as it is).
        monkeypatch.setattr(tftp_tree, "NETBOOT_DIR", str(tmp_path / "not-installed/{release}"))
        expected = re.escape(f"the TFTP root cannot be assembled; nothing was changed: {tmp_path}/not-installed/12"
                             " is missing: install the package debian-installer-12-netboot-amd64")
    with pytest.raises(KvmconfError) as failed:
        provision_server.deploy(_without_web(cluster), netns_dnsmasq, print)
    assert (_tree(config_dir), _tree(tftp_root)) == before  # web's entries and preseed are still served
    assert re.fullmatch(expected, str(failed.value)), failed.value
    assert netns_dnsmasq.pid() == pid


def _web_replaced_by_web2(cluster: Cluster) -> Cluster:
    """web gone (its entries and preseed would be deleted), web2 new (its entries and preseed would be served)."""
    import dataclasses

    web2 = dataclasses.replace(cluster.vm("web"), name="web2", mac="52:54:00:50:00:99", ip=IPv4Address("192.168.50.99"))
    return dataclasses.replace(_without_web(cluster), vms=(*_without_web(cluster).vms, web2))


def _served(config_dir: Path, tftp_root: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """What the provision server serves from: config_dir (but build/'s stamp, the writer's bookkeeping) and the
    TFTP root."""
    return ({rel: data for rel, data in _tree(config_dir).items() if rel != f"build/{STAMP}"}, _tree(tftp_root))


@pytest.mark.services
def test_a_new_dnsmasq_that_does_not_start_brings_the_previous_one_back(
        example: Cluster, tmp_path: Path, netns_dnsmasq: Dnsmasq, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    assert provision_server.deploy(cluster, netns_dnsmasq, print) == "started"
    live = config_dir / "dnsmasq"
    old_pid, old_live, before = netns_dnsmasq.pid(), _tree(live), _served(config_dir, tftp_root)
    web_entries = [rel for rel in provision_state.boot_entries(config_dir, "web") if (tftp_root / rel).is_file()]
    assert web_entries and "build/preseed/web.cfg" in before[0]
    # dnsmasq --test takes it; only the daemon finds there is no such interface to bind to.
    _bad_render(monkeypatch, "interface=nosuch0\n")
    with pytest.raises(dnsmasq_control.DnsmasqDidNotStart) as failed:
        provision_server.deploy(_web_replaced_by_web2(cluster), netns_dnsmasq, print)
    new_pid = netns_dnsmasq.pid()
    assert new_pid not in (None, old_pid)
    message = str(failed.value)
    assert message.startswith("dnsmasq did not start with the new configuration: `ip netns exec "), message
    assert message.endswith("failed with exit status 2: dnsmasq: unknown interface nosuch0; the previous"
                            f" configuration is back and its dnsmasq runs again (pid {new_pid})"), message
    assert _tree(live) == old_live  # the conf and web's hostsfile, as the dnsmasq running now reads them
    # And what TFTP and HTTP serve matches it: web's boot entries and preseed are back, web2's gone (it has no
    # reservation), byte for byte as before the deploy; no staging or kept-aside tree is left in config_dir.
    assert _served(config_dir, tftp_root) == before
    assert all((tftp_root / rel).is_file() for rel in web_entries)
    assert sorted(p.name for p in config_dir.iterdir() if p.name.startswith(".build")) == [".build.lock"]


@pytest.mark.services
def test_a_first_dnsmasq_that_does_not_start_leaves_nothing_served(
        example: Cluster, tmp_path: Path, netns_dnsmasq: Dnsmasq, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    _bad_render(monkeypatch, "interface=nosuch0\n")
    with pytest.raises(dnsmasq_control.DnsmasqDidNotStart) as failed:
        provision_server.deploy(cluster, netns_dnsmasq, print)
    message = str(failed.value)
    assert message.endswith("dnsmasq: unknown interface nosuch0; no dnsmasq of ours was running before, so none runs"
                            f" now; the new files are removed from {config_dir / 'dnsmasq'}"), message
    assert netns_dnsmasq.pid() is None
    # No dnsmasq config a later start would pick up, and nothing served for VMs that no DHCP reservation backs.
    assert _tree(config_dir / "dnsmasq") == {}
    assert [rel for rel in _tree(config_dir) if not rel.startswith("build/") and not rel.endswith(".lock")] == []
    assert provision_state.boot_entries(config_dir, "web") == []


@pytest.mark.services
def test_a_stopped_dnsmasq_whose_new_config_does_not_start_keeps_its_files(
        example: Cluster, tmp_path: Path, netns_dnsmasq: Dnsmasq, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    assert provision_server.deploy(cluster, netns_dnsmasq, print) == "started"
    stop_pid(netns_dnsmasq.pid())  # the admin stopped it; the files it ran on stay
    live = config_dir / "dnsmasq"
    old_live, before = _tree(live), _served(config_dir, tftp_root)
    _bad_render(monkeypatch, "interface=nosuch0\n")
    with pytest.raises(dnsmasq_control.DnsmasqDidNotStart) as failed:
        provision_server.deploy(_web_replaced_by_web2(cluster), netns_dnsmasq, print)
    message = str(failed.value)
    assert message.endswith("dnsmasq: unknown interface nosuch0; no dnsmasq of ours was running before, so none runs"
                            " now; the previous files are back"), message
    assert netns_dnsmasq.pid() is None
    assert _tree(live) == old_live
    assert _served(config_dir, tftp_root) == before


@pytest.mark.services
def test_a_deploy_stopped_before_dnsmasq_read_its_files_is_finished_by_the_next(
        example: Cluster, tmp_path: Path, netns_dnsmasq: Dnsmasq, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    provision_server.stage_build(cluster, config_dir)
    tftp_root.mkdir()  # dnsmasq refuses to start without it
    assert dnsmasq_control.deploy_dnsmasq(config_dir, netns_dnsmasq, print) == "started"
    (config_dir / "build/dnsmasq/dhcp-hosts/newvm").write_text("52:54:00:50:00:99,127.0.0.99,newvm,infinite\n")

    def ctrl_c() -> None:
        raise KeyboardInterrupt  # the admin's Ctrl-C, after the new hostsfile is written, before the SIGHUP

    monkeypatch.setattr(netns_dnsmasq, "reload", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        dnsmasq_control.deploy_dnsmasq(config_dir, netns_dnsmasq, print)
    monkeypatch.undo()
    assert (config_dir / "dnsmasq/dhcp-hosts/newvm").exists() and (config_dir / dnsmasq_control.PENDING).exists()
    # The files deployed are already the new ones: compared with them alone, this deploy was "unchanged", and
    # dnsmasq never learnt newvm's reservation.
    assert dnsmasq_control.deploy_dnsmasq(config_dir, netns_dnsmasq, print) == "restarted"
    assert not (config_dir / dnsmasq_control.PENDING).exists()
    deadline = time.monotonic() + 30
    while "dhcp-hosts/newvm" not in (tmp_path / "dnsmasq.log").read_text():
        assert time.monotonic() < deadline, "dnsmasq did not read newvm's hostsfile"
        time.sleep(0.1)
    assert dnsmasq_control.deploy_dnsmasq(config_dir, netns_dnsmasq, print) == "unchanged"


@pytest.mark.services
def test_a_vm_removed_and_later_added_again_gets_its_installer_again(
        example: Cluster, tmp_path: Path, netns_dnsmasq: Dnsmasq) -> None:
    """The install mark is the installed VM's: a VM of the same name created later (a new, empty disk) needs the
    installer, and the disk boots nothing until it has run."""
    config_dir, tftp_root = tmp_path / "kvmconf", tmp_path / "tftp"
    cluster = _at(example, config_dir, tftp_root)
    provision_server.deploy(cluster, netns_dnsmasq, print)
    web_entries = [rel for rel in provision_state.boot_entries(config_dir, "web") if (tftp_root / rel).is_file()]
    assert web_entries and tftp_tree.set_installed(config_dir, tftp_root, "web", True)
    provision_server.deploy(_without_web(cluster), netns_dnsmasq, print)
    assert provision_state.read_installed(config_dir) == set()  # no VM of that name is left to keep off its installer
    provision_server.deploy(cluster, netns_dnsmasq, print)
    assert all((tftp_root / rel).is_file() for rel in web_entries)


def test_a_build_kept_aside_is_put_back_as_it_was(example: Cluster, tmp_path: Path) -> None:
    build = provision_server.stage_build(example, tmp_path)
    before = _tree(build)
    with provision_state.build_kept_aside(tmp_path) as put_back:
        provision_server.stage_build(_web_replaced_by_web2(example), tmp_path)
        assert "preseed/web.cfg" not in _tree(build) and "preseed/web2.cfg" in _tree(build)
        put_back()
        after = _tree(build)
    assert {rel: data for rel, data in after.items() if rel != STAMP} \
        == {rel: data for rel, data in before.items() if rel != STAMP}
    assert not (tmp_path / ".build-previous").exists()


def test_with_no_build_before_putting_back_leaves_an_empty_one(example: Cluster, tmp_path: Path) -> None:
    # A first deploy whose dnsmasq does not start: nothing was served before, nothing is now.
    with provision_state.build_kept_aside(tmp_path) as put_back:
        build = provision_server.stage_build(example, tmp_path)
        put_back()
    assert [p.name for p in build.iterdir()] == [STAMP]
    assert provision_state.boot_entries(tmp_path, "web") == []


@pytest.mark.consumer
def test_the_dnsmasq_files_do_not_depend_on_how_the_inputs_path_was_written(
        example: Cluster, tmp_path: Path) -> None:
    """`invoke provision-server` from hosts/ reads ../cluster.conf: that must not restart (or SIGHUP) dnsmasq."""
    import dataclasses

    require_tool("dnsmasq")
    config_dir, fake = tmp_path / "kvmconf", FakeDnsmasq(tmp_path)
    assert (example.source, example.site.path) == ("cluster.conf", "site.toml")
    build = provision_server.stage_build(example, config_dir)
    assert dnsmasq_control.deploy_dnsmasq(config_dir, fake, print) == "started"
    built = _tree(build / "dnsmasq")
    from_elsewhere = dataclasses.replace(example, source="../x/cluster.conf",
                                         site=dataclasses.replace(example.site, path="../x/site.toml"))
    provision_server.stage_build(from_elsewhere, config_dir)
    assert _tree(build / "dnsmasq") == built
    assert dnsmasq_control.deploy_dnsmasq(config_dir, fake, print) == "unchanged"
    assert fake.calls == ["start dnsmasq.conf"]


@pytest.mark.services
def test_the_labs_http_server_exiting_at_start_is_told_at_once(example: Cluster, tmp_path: Path, netns: str) -> None:
    """Its address, [provision] http_url's 192.168.50.2, is not in the namespace (only loopback is): the server
    cannot bind and exits. serve_lab says so with the server's own words, without waiting out its start time."""
    require_tool("dnsmasq")
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    the_lab = lab.Lab(tmp_path / "lab", netns)
    the_lab.dir.mkdir()
    cluster = _at(example, tmp_path / "kvmconf", tmp_path / "tftp")
    started = time.monotonic()
    try:
        with pytest.raises(KvmconfError) as failed:
            provision_server.serve_lab(cluster, the_lab, print)
        took = time.monotonic() - started
    finally:  # the lab's dnsmasq, which the deploy started before the HTTP server
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((the_lab.dir / "dnsmasq.pid").read_text()), signal.SIGKILL)
    message = str(failed.value)
    assert message.startswith(f"lab: the provision HTTP server exited with status 1 before it served"
                              f" ({the_lab.dir / 'http-server.log'}): "), message
    assert message.endswith("kvmconf: cannot serve HTTP on 192.168.50.2:80: Cannot assign requested address (it must"
                            " be an address of this machine and a port no other server holds: [provision] http_url"
                            " names them)"), message
    assert took < 25, took  # the deploy takes seconds; the server's start alone is given 30 s
