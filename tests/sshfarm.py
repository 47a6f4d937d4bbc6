"""Stand-in VMs for deploy tests: one real sshd per VM on 127.0.0.x, chrooted into its own overlay root.

Each "VM" root is an overlayfs whose lower dir is this machine's / (read-only through the overlay) and whose
upper dir is per VM, in a tmpfs mounted for the run: what a deploy writes lands in the upper dir, never in
this machine's /etc, and unmounting the tmpfs throws it all away. The base lives under /run, because sshd's
ChrootDirectory refuses any path through a world-writable directory such as /tmp. systemctl and apt-get are
replaced inside the roots by stubs that log their arguments (virsh too: its stub lists no networks).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvmconf.processes import alive, stop_pid

BASE_PREFIX = "kvmconf-sshfarm-"
# Tools that would act on this machine's kernel or services (sysctl and modprobe through the bind-mounted /proc).
STUBBED = ("systemctl", "apt-get", "sysctl", "modprobe", "ifup", "netplan", "nmcli", "virsh")
STUB = """#!/bin/sh
mkdir -p /var/log/kvmconf-test
echo "$*" >> /var/log/kvmconf-test/{name}.log
"""


@dataclass
class Farm:
    base: Path
    ssh_config: Path
    known_hosts: Path
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)

    def root(self, vm: str) -> Path:
        return self.base / vm / "root"

    def upper(self, vm: str) -> Path:
        return self.base / vm / "upper"

    def log(self, vm: str, tool: str) -> list[str]:
        # Through the mounted root: changing an overlay's upper dir under it is undefined behaviour.
        path = self.root(vm) / "var/log/kvmconf-test" / f"{tool}.log"
        return path.read_text().splitlines() if path.exists() else []

    def clear_logs(self) -> None:
        for vm in self.addresses:
            for path in (self.root(vm) / "var/log/kvmconf-test").glob("*.log"):
                path.unlink()


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def teardown(base: Path) -> None:
    """Stop the farm's sshds (by PID) and unmount everything under base, innermost first."""
    for pidfile in base.glob("*/sshd.pid"):
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(base))]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def reap_leftovers() -> None:
    """A killed run leaves its farm behind: remove those whose owning PID is gone."""
    for base in Path("/run").glob(f"{BASE_PREFIX}*"):
        pid = base.name.removeprefix(BASE_PREFIX).split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            teardown(base)


def start(names: list[str], tag: str = "") -> Farm:
    reap_leftovers()
    base = Path("/run") / f"{BASE_PREFIX}{os.getpid()}{tag}"
    base.mkdir(mode=0o755)
    farm = Farm(base, base / "ssh_config", base / "known_hosts")
    try:
        _mount("-t", "tmpfs", "-o", "mode=0755,size=512m", "tmpfs", str(base))
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "client_key")], check=True)
        (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        config_lines = []
        for index, name in enumerate(names):
            address = f"127.0.0.{20 + index}"
            farm.addresses[name] = (address, _start_vm(farm, name, address))
            config_lines += [f"Host {name}", f"    HostName {farm.addresses[name][0]}",
                             f"    Port {farm.addresses[name][1]}", "    User root",
                             f"    IdentityFile {base / 'client_key'}", "    IdentitiesOnly yes",
                             f"    UserKnownHostsFile {farm.known_hosts}", ""]
        farm.ssh_config.write_text("\n".join(config_lines))
        for name, (address, port) in farm.addresses.items():
            _wait(address, port, name)
    except BaseException:
        teardown(base)
        raise
    return farm


def _start_vm(farm: Farm, name: str, address: str) -> int:
    vm_dir = farm.base / name
    for sub in ("upper", "work", "root"):
        (vm_dir / sub).mkdir(parents=True)
    _mount("-t", "overlay", "overlay", "-o",
           f"lowerdir=/,upperdir={vm_dir / 'upper'},workdir={vm_dir / 'work'}", str(vm_dir / "root"))
    root = vm_dir / "root"
    for special in ("proc", "dev"):
        _mount("--bind", f"/{special}", str(root / special))
    for tool in STUBBED:
        stub = root / "usr/local/sbin" / tool
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(STUB.format(name=tool))
        stub.chmod(0o755)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(vm_dir / "host_key")], check=True)
    port = free_port(address)
    (vm_dir / "sshd_config").write_text("\n".join([
        f"ListenAddress {address}:{port}", f"HostKey {vm_dir / 'host_key'}", f"PidFile {vm_dir / 'sshd.pid'}",
        f"AuthorizedKeysFile {farm.base / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        f"ChrootDirectory {root}", "Subsystem sftp internal-sftp", "MaxSessions 50", "MaxStartups 100",
        "LogLevel ERROR", ""]))
    _launch(vm_dir)
    return port


def _launch(vm_dir: Path) -> None:
    subprocess.Popen(["/usr/sbin/sshd", "-f", str(vm_dir / "sshd_config"), "-E", str(vm_dir / "sshd.log")])


# For reconfigured(): the VM's sshd lets clients log in but refuses every session, so each command or SFTP channel
# fails with paramiko's ChannelException; or it refuses SFTP only, which paramiko reports as an SSHException.
# Both are SSHExceptions, no OSErrors, as the error of a session that drops (a VM rebooting) as a channel opens is.
SESSIONS_REFUSED = ("MaxSessions 50", "MaxSessions 0")
SFTP_REFUSED = ("Subsystem sftp internal-sftp", "")


@contextmanager
def reconfigured(farm: Farm, vm: str, change: tuple[str, str]) -> Iterator[None]:
    """Inside, the VM's sshd runs with ``change`` (old line, new line) made to its config; connections made before
    keep the old one."""
    config = farm.base / vm / "sshd_config"
    original = config.read_text()
    assert change[0] in original, change
    config.write_text(original.replace(*change))
    _restart(farm, vm)
    try:
        yield
    finally:
        config.write_text(original)
        _restart(farm, vm)


def _restart(farm: Farm, vm: str) -> None:
    """The VM's sshd stopped (by PID) and started again, on its address and port, reading its config anew."""
    stop_pid(int((farm.base / vm / "sshd.pid").read_text()))
    _launch(farm.base / vm)
    _wait(*farm.addresses[vm], vm)


def _wait(address: str, port: int, name: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection((address, port), timeout=2) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd for {name} on {address}:{port} did not start")
