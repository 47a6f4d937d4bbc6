"""The provision server end to end in the lab: PXE (BIOS and UEFI) up to the preseed request, install marks, reloads.

One lab serves the module (tests/fixtures/pxe-cluster.conf on lab-site.toml). The ``booted`` fixture
provisions the BIOS VM, the UEFI VM and a VM whose MAC is not in the served cluster.conf, all at
once (each boot costs minutes of software emulation on shared cores), and waits until both known
VMs have requested their preseeds. The tests then read what the daemons logged. On a timeout the
failure shows the tail of each VM's serial console (the installer runs there: console=ttyS0).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf import dnsmasq_control, domains, install_http, lab, processes, provision_server, provision_state
from kvmconf.connection import connections
from kvmconf.errors import KvmconfError
from kvmconf.provision import provision
from tests.labs import FIXTURES, quiet, running_lab
from tests.tools import ROOT

# The first test sets up the boots; pytest-timeout counts that setup.
pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(1200)]

NETNS_PREFIX = "kvmconf-pxetest-"  # + the pytest PID: a killed run's namespaces are removed by the next run
BOOT_DEADLINE = 840.0  # seconds to the preseed request: ~80 s alone under emulation, 3-4 min on 2 busy shared cores
STRANGER = "stranger\t52:54:00:50:00:99\t192.168.50.99\t128\t1\t1\t-\thost=kvm0 install=pxe\n"


@dataclass
class Vm:
    name: str
    mac: str
    ip: str
    host: str


BIOS = Vm("pxebios", "52:54:00:50:00:41", "192.168.50.41", "kvm0")
UEFI = Vm("pxeuefi", "52:54:00:50:00:42", "192.168.50.42", "kvm1")


class Console:
    """Everything a domain writes to its serial console from now on, read by a thread through libvirt."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self.data = bytearray()
        self.stream = conn.newStream(0)
        dom.openConsole(None, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with suppress(libvirt.libvirtError):
            while True:
                chunk = self.stream.recv(4096)
                if not isinstance(chunk, bytes) or not chunk:
                    return
                self.data += chunk

    def tail(self, chars: int = 1500) -> str:
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.data.decode(errors="replace"))
        return text[-chars:]

    def close(self) -> None:
        with suppress(libvirt.libvirtError):
            self.stream.abort()


def invoke(workdir: Path, the_lab: lab.Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVMCONF_CLUSTER": str(workdir / "cluster.conf"), "KVMCONF_SITE": str(workdir / "site.toml"),
           "KVMCONF_LAB": str(the_lab.dir)}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL)


def ns_get(the_lab: lab.Lab, url: str) -> str:
    """GET a URL from inside the lab's namespace (where the provision server is)."""
    code = ("import sys, urllib.request;"
            " sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")
    return subprocess.run(["ip", "netns", "exec", the_lab.netns, sys.executable, "-c", code, url],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def since(path: Path, offset: int) -> str:
    with path.open() as f:
        f.seek(offset)
        return f.read()


def wait_for(what: str, check: object, timeout: float, report: object = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s" + (f"\n{report()}" if report else ""))  # type: ignore[operator]
        time.sleep(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pxe-inputs")
    shutil.copy(FIXTURES / "pxe-cluster.conf", directory / "cluster.conf")
    shutil.copy(FIXTURES / "lab-site.toml", directory / "site.toml")
    return directory


@pytest.fixture(scope="module")
def pxe_lab(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("pxelab"), NETNS_PREFIX, workdir / "cluster.conf",
                           workdir / "site.toml")


@pytest.fixture(scope="module")
def cluster(pxe_lab: lab.Lab, workdir: Path) -> Cluster:
    return lab.remap(load_cluster(workdir / "cluster.conf", workdir / "site.toml"), pxe_lab)


@dataclass
class Booted:
    the_lab: lab.Lab
    config_dir: Path
    dnsmasq_log: str  # from before the VMs started
    http_log: str
    seconds_to_preseed: dict[str, float]


@pytest.fixture(scope="module")
def booted(pxe_lab: lab.Lab, cluster: Cluster, workdir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Booted]:
    config_dir = Path(cluster.site.provision.config_dir)
    dnsmasq_log, http_log = pxe_lab.dir / "dnsmasq.log", config_dir / install_http.HTTP_LOG
    dns_offset = dnsmasq_log.stat().st_size
    http_offset = http_log.stat().st_size if http_log.exists() else 0
    # The stranger is provisioned from a cluster.conf the provision server never saw: its MAC is unknown there.
    other = tmp_path_factory.mktemp("stranger")
    (other / "cluster.conf").write_text((workdir / "cluster.conf").read_text() + STRANGER)
    strange = lab.remap(load_cluster(other / "cluster.conf", workdir / "site.toml"), pxe_lab)
    start = time.monotonic()
    result = invoke(workdir, pxe_lab, "provision", "--vm", BIOS.name, "--vm", UEFI.name)
    assert result.returncode == 0, result.stderr
    with connections(strange) as strange_conns:
        provision(strange, ["stranger"], strange_conns, log=quiet)
    dnsmasq_seen = lambda: since(dnsmasq_log, dns_offset)  # noqa: E731
    wait_for("the unknown MAC asks for an address", lambda: "52:54:00:50:00:99 ignored" in dnsmasq_seen(), 120)
    conns = {host: libvirt.open(cluster.site.hosts[host].uri) for host in ("kvm0", "kvm1")}
    with suppress(libvirt.libvirtError):  # proven: it only costs CPU from here on
        domains.power_off(conns["kvm0"].lookupByName("stranger"))
    consoles = {vm.name: Console(conns[vm.host], conns[vm.host].lookupByName(vm.name)) for vm in (BIOS, UEFI)}
    seconds: dict[str, float] = {}
    try:
        def report() -> str:
            return "\n".join(f"--- serial console of {name} (last lines) ---\n{c.tail()}"
                             for name, c in consoles.items())

        def both_asked() -> bool:
            text = since(http_log, http_offset) if http_log.exists() else ""
            for vm in (BIOS, UEFI):
                if vm.name not in seconds and f"GET /preseed/{vm.name}.cfg" in text:
                    seconds[vm.name] = time.monotonic() - start
            return len(seconds) == 2

        wait_for("both VMs request their preseeds", both_asked, BOOT_DEADLINE, report)
        print(f"\nseconds from `invoke provision` to the preseed request: {seconds}")
        yield Booted(pxe_lab, config_dir, since(dnsmasq_log, dns_offset), since(http_log, http_offset), seconds)
    finally:
        for console in consoles.values():
            console.close()
        with suppress(libvirt.libvirtError):
            domains.power_off(conns[UEFI.host].lookupByName(UEFI.name))
        for conn in conns.values():
            conn.close()


def _sent(log: str, ip: str) -> list[str]:
    """The TFTP files dnsmasq sent to ``ip``, relative to the TFTP root."""
    return [m.group(1) for m in re.finditer(rf"dnsmasq-tftp\[\d+\]: sent \S*?/tftp/(\S+) to {re.escape(ip)}\b", log)]


def _assert_installer_path(booted: Booted, vm: Vm, boot_config: str, default: str) -> None:
    log = booted.dnsmasq_log
    assert re.search(rf"DHCPACK\(br0\) {re.escape(vm.ip)} {vm.mac} {vm.name}\b", log), log[-3000:]
    acks = re.findall(rf"DHCPACK\(br0\) (\S+) {vm.mac}", log)
    assert acks and set(acks) == {vm.ip}, acks
    leases = (booted.the_lab.dir / "dnsmasq.leases").read_text().split("\n")
    assert any(line.split()[1:4] == [vm.mac, vm.ip, vm.name] for line in leases if line), leases
    sent = _sent(log, vm.ip)
    assert boot_config in sent, sent
    assert default not in sent, sent
    assert "debian-installer/amd64/linux" in sent and "debian-installer/amd64/initrd.gz" in sent, sent
    requests = [line.split() for line in booted.http_log.splitlines()]
    assert [vm.ip, "GET", f"/preseed/{vm.name}.cfg", "200"] in [r[1:] for r in requests], requests
    # It asked for no other VM's preseed.
    assert {r[3] for r in requests if r[1] == vm.ip and r[3].startswith("/preseed/")} == {f"/preseed/{vm.name}.cfg"}


def test_bios_vm_pxe_boots_its_own_pxelinux_entry_and_requests_its_own_preseed(booted: Booted) -> None:
    _assert_installer_path(booted, BIOS, "pxelinux.cfg/01-52-54-00-50-00-41", "pxelinux.cfg/default")
    assert "pxelinux.0" in _sent(booted.dnsmasq_log, BIOS.ip)
    assert "bootfile name: pxelinux.0" in booted.dnsmasq_log  # what the installed VM must no longer get


def test_uefi_vm_pxe_boots_its_own_grub_entry_and_requests_its_own_preseed(booted: Booted) -> None:
    _assert_installer_path(booted, UEFI, "grub/grub.cfg-01-52-54-00-50-00-42", "grub/grub.cfg")
    assert "grub/grubx64.efi" in _sent(booted.dnsmasq_log, UEFI.ip)


def test_a_mac_not_in_cluster_conf_gets_no_address_and_no_installer(booted: Booted) -> None:
    log = booted.dnsmasq_log
    assert re.search(r"DHCPDISCOVER\(br0\) 52:54:00:50:00:99 ignored", log), log[-3000:]
    assert not re.search(r"DHCP(OFFER|ACK)\(br0\) \S+ 52:54:00:50:00:99", log)
    assert not _sent(log, "192.168.50.99")
    assert {line.split()[1] for line in booted.http_log.splitlines()} <= {BIOS.ip, UEFI.ip}


ENTRY = "pxelinux.cfg/01-52-54-00-50-00-41"  # the BIOS VM's own pxelinux entry


def test_once_marked_installed_the_vms_next_pxe_boot_reads_the_local_boot_default(
        booted: Booted, cluster: Cluster) -> None:
    the_lab = booted.the_lab
    tftp_root = Path(cluster.site.provision.tftp_root)
    pid = int((the_lab.dir / "dnsmasq.pid").read_text())
    dnsmasq_log = the_lab.dir / "dnsmasq.log"
    assert (tftp_root / ENTRY).exists()
    assert ns_get(the_lab, f"http://192.168.50.2/installed/{BIOS.name}") == "installed\n"
    assert not (tftp_root / ENTRY).exists()
    assert provision_state.read_installed(booted.config_dir) == {BIOS.name}
    http_log = (booted.config_dir / install_http.HTTP_LOG).read_text().splitlines()
    assert http_log[-1].split()[1:] == ["192.168.50.2", "GET", f"/installed/{BIOS.name}", "200"], http_log[-1]
    offset = dnsmasq_log.stat().st_size
    conn = libvirt.open(cluster.site.hosts[BIOS.host].uri)
    try:
        dom = conn.lookupByName(BIOS.name)
        console = Console(conn, dom)
        dom.reset()  # its disk is still empty: the firmware goes to the NIC again

        def report() -> str:
            return (f"--- dnsmasq log since the reset ---\n{since(dnsmasq_log, offset)[-3000:]}\n"
                    f"--- the end of the log before ---\n{since(dnsmasq_log, 0)[:offset][-1500:]}\n"
                    f"--- console ---\n{console.tail()}\nstate {dom.state()}")

        wait_for("the reset VM reads pxelinux.cfg/default",
                 lambda: "pxelinux.cfg/default" in _sent(since(dnsmasq_log, offset), BIOS.ip), 300, report)
        console.close()
        after = since(dnsmasq_log, offset)
        domains.power_off(dom)
    finally:
        conn.close()
    assert processes.alive(pid) and int((the_lab.dir / "dnsmasq.pid").read_text()) == pid  # dnsmasq was not touched
    sent = _sent(after, BIOS.ip)
    assert ENTRY not in sent and "debian-installer/amd64/linux" not in sent, sent
    default = (Path(cluster.site.provision.tftp_root) / "pxelinux.cfg/default").read_text()
    assert "DEFAULT local" in default and "LOCALBOOT 0" in default


def test_the_install_mark_survives_a_redeploy_and_reinstall_flips_it_back(booted: Booted, workdir: Path,
                                                                          cluster: Cluster) -> None:
    the_lab, entry = booted.the_lab, Path(cluster.site.provision.tftp_root) / ENTRY
    provision_state.write_installed(booted.config_dir, {BIOS.name})
    again = invoke(workdir, the_lab, "provision-server")
    assert again.returncode == 0, again.stderr
    assert not entry.exists()
    flip = invoke(workdir, the_lab, "reinstall", "--vm", BIOS.name)
    assert flip.returncode == 0, flip.stderr
    assert f"{BIOS.name}: network install enabled again" in flip.stdout
    assert f"url=http://192.168.50.2/preseed/{BIOS.name}.cfg" in entry.read_text()
    assert provision_state.read_installed(booted.config_dir) == set()
    unknown = invoke(workdir, the_lab, "reinstall", "--vm", "pxebois")  # as every task: a usage error, exit 2
    assert (unknown.returncode, unknown.stderr) == (
        2, f"kvmconf: 'pxebois' is not a VM of {workdir / 'cluster.conf'} (did you mean {BIOS.name}?);"
           f" expected one of: {BIOS.name}, {UEFI.name}\n")


def test_adding_a_vm_changes_only_the_hostsfiles_and_sighups_dnsmasq(pxe_lab: lab.Lab, workdir: Path,
                                                                      cluster: Cluster) -> None:
    live = Path(cluster.site.provision.config_dir) / "dnsmasq"
    before = invoke(workdir, pxe_lab, "provision-server")
    assert before.returncode == 0, before.stderr
    pid, conf = pxe_lab.dir / "dnsmasq.pid", live / "dnsmasq.conf"
    old_pid, old_conf = pid.read_text(), (conf.read_bytes(), conf.stat().st_ino, conf.stat().st_mtime_ns)
    old_hosts = {p.name: p.read_text() for p in (live / "dhcp-hosts").iterdir()}
    log = pxe_lab.dir / "dnsmasq.log"
    offset = log.stat().st_size
    # Edited in place: the files' banners name cluster.conf's path, so a copy elsewhere would change the conf too.
    original = (workdir / "cluster.conf").read_text()
    newvm = "newvm\t52:54:00:50:00:77\t192.168.50.77\t128\t1\t1\t-\thost=kvm0\n"
    (workdir / "cluster.conf").write_text(original + newvm)
    try:
        result = invoke(workdir, pxe_lab, "provision-server")
    finally:
        (workdir / "cluster.conf").write_text(original)
    assert result.returncode == 0, result.stderr
    assert "dnsmasq reloaded" in result.stdout
    assert pid.read_text() == old_pid and processes.alive(int(old_pid))
    assert (conf.read_bytes(), conf.stat().st_ino, conf.stat().st_mtime_ns) == old_conf
    now = {p.name: p.read_text() for p in (live / "dhcp-hosts").iterdir()}
    assert now.keys() - old_hosts.keys() == {"newvm"} and {k: now[k] for k in old_hosts} == old_hosts
    assert "192.168.50.77 newvm.lab.example.org newvm" in (live / "hosts").read_text()
    wait_for("dnsmasq re-reads the new hostsfile", lambda: "dhcp-hosts/newvm" in since(log, offset), 30)
    back = invoke(workdir, pxe_lab, "provision-server")
    assert back.returncode == 0 and "dnsmasq reloaded" in back.stdout, back.stderr
    assert not (live / "dhcp-hosts" / "newvm").exists() and pid.read_text() == old_pid


def test_a_broken_config_never_replaces_the_running_one(pxe_lab: lab.Lab, workdir: Path, cluster: Cluster) -> None:
    config_dir = Path(cluster.site.provision.config_dir)
    dnsmasq = provision_server.lab_dnsmasq(pxe_lab)
    assert provision_server.deploy(cluster, dnsmasq, quiet) in ("unchanged", "reloaded")
    old_pid, conf = dnsmasq.pid(), config_dir / "dnsmasq" / "dnsmasq.conf"
    good = conf.read_text()
    candidate = provision_state.build_dir_in(config_dir) / "dnsmasq" / "dnsmasq.conf"
    candidate.write_text(good + "no-such-option=1\n")
    with pytest.raises(KvmconfError, match="dnsmasq --test rejected the new configuration; the running one stays"):
        dnsmasq_control.deploy_dnsmasq(config_dir, dnsmasq, quiet)
    assert conf.read_text() == good and dnsmasq.pid() == old_pid
    # A bad hostsfile line: dnsmasq --test never reads hostsfiles and the daemon would skip it silently.
    candidate.write_text(good)
    bad = provision_state.build_dir_in(config_dir) / "dnsmasq" / "dhcp-hosts" / "zz-bad"
    bad.write_text("52:54:00:zz:00:01,192.168.50.88,bad,infinite\n")
    with pytest.raises(KvmconfError, match="bad hex constant"):
        dnsmasq_control.deploy_dnsmasq(config_dir, dnsmasq, quiet)
    assert not (config_dir / "dnsmasq" / "dhcp-hosts" / "zz-bad").exists() and dnsmasq.pid() == old_pid
    bad.unlink()
    # A main conf change that passes the check restarts dnsmasq on it.
    candidate.write_text(good + "# changed\n")
    assert dnsmasq_control.deploy_dnsmasq(config_dir, dnsmasq, quiet) == "restarted"
    assert dnsmasq.pid() not in (None, old_pid) and conf.read_text() == good + "# changed\n"
    assert provision_server.deploy(cluster, dnsmasq, quiet) == "restarted"  # back to the generated conf
