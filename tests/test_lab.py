"""Provisioning against a real libvirtd + QEMU (software emulation) in the lab, as an admin would use it.

One lab (network namespace, private libvirtd/virtlogd, the generated dnsmasq) serves the whole
module; every test starts from an empty lab and leaves one (see ``clean``). The VMs are those of
tests/fixtures/lab-cluster.conf: the example's kinds of VM (qcow2 PXE, raw, UEFI cloud overlay;
LVM is added by its test) with 128-160 MB of RAM and 1-2 GB thin disks; they boot nothing but
firmware and PXE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from generators.model import Cluster, Disk, DiskKind
from generators.validate import load_cluster
from kvmconf import disks, domains, lab, lifecycle, processes
from kvmconf.capacity import capacity
from kvmconf.connection import connections
from kvmconf.disks import GIB
from kvmconf.errors import HostUnreachable
from kvmconf.plan import Action, make_plan
from kvmconf.provision import Options, provision
from kvmconf.runner import Result
from kvmconf.status import format_status, status
from tests.labs import FIXTURES, quiet, require_lab, running_lab
from tests.tools import ROOT, mount_tmpfs, require_tool

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-test-"  # + the pytest process's PID: a killed run's namespaces are found and removed


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Copies of the lab fixtures that a test may edit."""
    shutil.copy(FIXTURES / "lab-cluster.conf", tmp_path / "cluster.conf")
    shutil.copy(FIXTURES / "lab-site.toml", tmp_path / "site.toml")
    return tmp_path


def domains_on(the_lab: lab.Lab, host: str | None = None) -> list[str]:
    """Names of the domains the lab daemon of ``host`` has (every daemon's when None), sorted."""
    names = []
    for daemon in [host] if host else the_lab.daemons:
        conn = libvirt.open(the_lab.uri_of(daemon))
        try:
            names += [dom.name() for dom in conn.listAllDomains()]
        finally:
            conn.close()
    return sorted(names)


@contextlib.contextmanager
def lab_domain(the_lab: lab.Lab, host: str, name: str) -> Iterator[libvirt.virDomain]:
    """The domain ``name`` on the lab daemon of ``host``, looked up on a connection of its own that is closed after."""
    conn = libvirt.open(the_lab.uri_of(host))
    try:
        yield conn.lookupByName(name)
    finally:
        conn.close()


def _empty(the_lab: lab.Lab) -> None:
    for host in the_lab.daemons:
        conn = libvirt.open(the_lab.uri_of(host))
        try:
            for dom in conn.listAllDomains():
                domains.power_off(dom)
                domains.undefine(dom, keep_nvram=False)
        finally:
            conn.close()
    shutil.rmtree(the_lab.images, ignore_errors=True)
    for host in ("kvm0", "kvm1"):
        (the_lab.images / host).mkdir(parents=True)


@pytest.fixture
def clean(the_lab: lab.Lab) -> Iterator[lab.Lab]:
    """The lab with no domain and no disk, before and after the test."""
    _empty(the_lab)
    yield the_lab
    _empty(the_lab)


@pytest.fixture
def cluster(clean: lab.Lab, workdir: Path) -> Cluster:
    """The lab cluster as the tasks see it with KVMCONF_LAB set."""
    return lab.remap(load_cluster(workdir / "cluster.conf", workdir / "site.toml"), clean)


def invoke(workdir: Path, the_lab: lab.Lab | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a task as the admin does, on the cluster in ``workdir`` and (with KVMCONF_LAB) the lab."""
    env = {**os.environ, "KVMCONF_CLUSTER": str(workdir / "cluster.conf"), "KVMCONF_SITE": str(workdir / "site.toml")}
    env.pop("KVMCONF_LAB", None)
    if the_lab is not None:
        env["KVMCONF_LAB"] = str(the_lab.dir)
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL)


def set_ram(workdir: Path, name: str, ram_mb: int) -> None:
    path = workdir / "cluster.conf"
    lines = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == name:
            fields[3] = str(ram_mb)
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n")


def changed_lines(output: str) -> list[str]:
    """The removed and added lines of every diff in `invoke plan`'s output (indented by 6 there)."""
    return [line[6:] for line in output.splitlines() if re.match(r"      [-+](?![-+]{2} )", line)]


# --- provisioning, as the acceptance asks ---------------------------------------------------------

def test_two_vms_run_with_ram_vcpus_mac_and_disk_of_cluster_conf_and_again_is_no_change(
        cluster: Cluster, workdir: Path, clean: lab.Lab) -> None:
    first = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "db")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == "2 created, 0 to change (shown, not applied), 0 unchanged"
    for name, fmt in (("web", "qcow2"), ("db", "raw")):
        vm = cluster.vm(name)
        with lab_domain(clean, vm.host, name) as dom:
            state, max_kib, _, cpus, _ = dom.info()
            assert (state, max_kib, cpus) == (libvirt.VIR_DOMAIN_RUNNING, vm.ram_mb * 1024, vm.cpus)
            root = ET.fromstring(dom.XMLDesc(0))
            assert [m.get("address") for m in root.iterfind("devices/interface/mac")] == [vm.mac]
            assert root.find("devices/disk/driver").get("type") == fmt  # type: ignore[union-attr]
            capacity, _allocation, _ = dom.blockInfo("vda")
            assert capacity == vm.disk.size_gb * GIB
    again = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "db")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["web: no change", "db: no change",
                                         "0 created, 0 to change (shown, not applied), 2 unchanged"]


def test_plan_shows_exactly_a_ram_change_and_provision_applies_it_only_with_apply(
        cluster: Cluster, workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0
    set_ram(workdir, "web", 192)
    plan = invoke(workdir, clean, "plan")
    assert plan.returncode == 0, plan.stderr
    assert changed_lines(plan.stdout) == [
        '-  <memory unit="KiB">131072</memory>', '-  <currentMemory unit="KiB">131072</currentMemory>',
        '+  <memory unit="KiB">196608</memory>', '+  <currentMemory unit="KiB">196608</currentMemory>']
    assert "  ~ web  change:" in plan.stdout and "  + db   create raw disk" in plan.stdout
    shown = invoke(workdir, clean, "provision", "--vm", "web")
    assert "web: definition differs from cluster.conf (not applied; run again with --apply):" in shown.stdout
    applied = invoke(workdir, clean, "provision", "--vm", "web", "--apply")
    assert applied.returncode == 0 and "web: applied the new definition" in applied.stdout
    assert "  = web  no change" in invoke(workdir, clean, "plan", "--vm", "web").stdout


def test_status_shows_the_vms_and_the_drift_of_a_manual_setmaxmem(
        cluster: Cluster, workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "web", "--vm", "db").returncode == 0
    virsh = require_tool("virsh")
    done = subprocess.run([virsh, "-c", clean.uri, "setmaxmem", "db", "262144", "--config"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    status = invoke(workdir, clean, "status")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("  ")}
    assert re.fullmatch(r"  web +running +192\.168\.50\.21 +128 +1 +1/0\.\d\d +yes +none", rows["web"])
    assert re.match(r"  db +running +192\.168\.50\.20 +256 +1 +2/0\.\d\d +yes +RAM 256 MB \(cluster.conf: 160\);"
                    r" running with 160 MB RAM until restarted$", rows["db"])
    assert re.search(r"  cloud +not defined .* not provisioned$", rows["cloud"])


def test_a_start_libvirt_refuses_is_one_line_naming_what_failed_not_a_traceback(
        cluster: Cluster, workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "web", "--no-start").returncode == 0
    with lab_domain(clean, "kvm0", "web") as dom:  # a bridge that is not on the host, as after a rename of br0
        dom.connect().defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace("'br0'", "'kvmconf-nobr'"))
    refused = invoke(workdir, clean, "start", "--vm", "web")
    assert (refused.returncode, refused.stderr) == (
        1, "kvmconf: web on kvm0: libvirt failed: Cannot get interface MTU on 'kvmconf-nobr': No such device\n")


def test_status_plan_and_capacity_show_every_host_when_one_hosts_libvirtd_goes_away_mid_run(
        workdir: Path, tmp_path: Path) -> None:
    require_lab()
    inputs = load_cluster(workdir / "cluster.conf", workdir / "site.toml")
    own = lab.up(inputs, tmp_path / "lab", f"{NETNS_PREFIX}{os.getpid()}-gone", log=quiet)  # its kvm1 is stopped
    try:
        cluster = lab.remap(inputs, own)
        kvm1 = own.pids[own.pid_key("libvirtd", "kvm1")]

        def open_then_lose_kvm1(uri: str) -> libvirt.virConnect:
            conn = libvirt.open(uri)
            if uri == own.uri_of("kvm1"):
                processes.stop_pid(kvm1)  # connected, then the daemon goes (a restart, a crash): its calls fail
            return conn

        with connections(cluster, open_then_lose_kvm1) as conns:
            hosts = status(cluster, conns)
            planned = make_plan(cluster, cluster.vms, conns, strict=False).hosts  # as `invoke plan` (not provision)
            counted = capacity(cluster, conns)
        assert not processes.alive(kvm1)
        gone = re.compile(r"host 'kvm1': libvirt failed: [^\n]*(End of file while reading data|Cannot recv data|"
                          r"Cannot write data|client socket is closed)[^\n]*")
        # Asked again, plan and capacity try a new connection to kvm1, and say that nothing answers there.
        unreachable = (f"host 'kvm1': cannot connect to libvirt at {own.uri_of('kvm1')} (Failed to connect socket to"
                       f" '{own.host_dir('kvm1')}/sock/libvirt-sock': No such file or directory); check [hosts.kvm1]"
                       f" uri in {workdir / 'site.toml'} and that libvirtd runs there")
        for report in (hosts, planned, counted):
            assert [h.host for h in report] == ["kvm0", "kvm1"] and report[0].error is None
        assert gone.fullmatch(hosts[1].error or ""), hosts[1].error
        assert planned[1].error == counted[1].error == unreachable
        assert [(vm.name, vm.state) for vm in hosts[0].vms] == [("web", "not defined"), ("db", "not defined")]
        assert format_status(hosts).splitlines()[-2:] == ["kvm1 (" + own.uri_of("kvm1") + "):", f"  ! {hosts[1].error}"]
        assert [(p.vm.name, p.action) for p in planned[0].vms] == [("web", Action.CREATE), ("db", Action.CREATE)]
        assert planned[1].vms == [] and (counted[0].defined, counted[1].defined) == (0, None)
    finally:
        lab.teardown(own, quiet)


def test_a_connection_libvirtd_dropped_is_opened_again_for_the_next_use(cluster: Cluster, clean: lab.Lab) -> None:
    """As when libvirtd restarts (an upgrade of libvirt does it) during `backup --all`: the dropped connection failed
    every call after it, so every VM after it failed, each with a libvirt error. The daemon drops the client itself
    here (virt-admin client-disconnect), the nearest this machine has to a restart under a running task."""
    require_tool("virt-admin")
    admin = f"libvirtd:///system?socket={clean.host_dir('kvm0')}/sock/libvirt-admin-sock"

    def clients() -> set[str]:
        listed = subprocess.run(["virt-admin", "-c", admin, "client-list", "libvirtd"], capture_output=True, text=True,
                                check=True).stdout
        return {line.split()[0] for line in listed.splitlines()[2:] if line.strip()}

    before = clients()  # connections of the module's other tests may still be open
    with connections(cluster) as conns:
        first = conns.get("kvm0")
        assert first.listAllDomains() == []
        [ours] = clients() - before
        subprocess.run(["virt-admin", "-c", admin, "client-disconnect", "libvirtd", ours], check=True,
                       capture_output=True)
        again = conns.get("kvm0")
        assert again is not first and again.listAllDomains() == []


def test_destroy_keeps_the_disk_and_provisioning_over_it_changes_nothing_until_purged(
        cluster: Cluster, workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "db").returncode == 0
    disk = Path(disks.disk_spec(cluster, cluster.vm("db")).path)
    unasked = invoke(workdir, clean, "destroy", "--vm", "db")  # running: powering it off needs a yes or --force
    assert (unasked.returncode, unasked.stderr) == (1, "kvmconf: db on kvm0: power off (it is running: what the guest"
                                                       " has not written to disk is lost), undefine. Go ahead? There is"
                                                       " no terminal to ask on: confirm with --force.\n")
    assert domains_on(clean) == ["db"]
    destroyed = invoke(workdir, clean, "destroy", "--vm", "db", "--force")
    assert destroyed.returncode == 0 and f"db: disk {disk} kept (remove it with --purge)" in destroyed.stdout
    assert disk.exists()
    before = disk.stat()
    refused = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "db")
    assert refused.returncode == 1
    assert refused.stderr == (f"kvmconf: db: its disk {disk} already exists and is never overwritten; attach it as it"
                              " is with --reuse-disk, or remove it with `invoke destroy --vm db --purge` if it is a"
                              " leftover\nnothing was changed\n")
    assert domains_on(clean) == []
    assert sorted(p.name for p in clean.images.rglob("*") if p.is_file()) == ["db.img"]
    assert (disk.stat().st_mtime_ns, disk.stat().st_ino) == (before.st_mtime_ns, before.st_ino)
    unasked = invoke(workdir, clean, "destroy", "--vm", "db", "--purge")
    assert unasked.returncode == 1 and "There is no terminal to ask on: confirm with --force." in unasked.stderr
    assert disk.exists()
    purged = invoke(workdir, clean, "destroy", "--vm", "db", "--purge", "--force")
    assert purged.returncode == 0 and f"db: removed raw disk {disk}" in purged.stdout
    assert not disk.exists()


def test_a_failing_disk_create_midway_leaves_nothing_the_run_created(
        cluster: Cluster, workdir: Path, clean: lab.Lab) -> None:
    # cloud (on kvm1) comes after web (on kvm0): its qemu-img fails, on a disk_dir that is there (a missing one is
    # found by the plan, before anything is created) but read-only.
    with mount_tmpfs(clean.images / "kvm1", "1m", read_only=True):
        failed = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "cloud")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.startswith("kvmconf: provisioning failed: localhost: `qemu-img create -q -f qcow2")
    assert "\nundone: web: started; web: defined on kvm0; web: created qcow2 disk" in failed.stderr
    assert domains_on(clean) == []
    assert [p for p in clean.images.rglob("*") if p.is_file()] == []


def test_an_unreachable_uri_creates_nothing(cluster: Cluster, clean: lab.Lab) -> None:
    nowhere = "qemu+unix:///system?socket=/nonexistent/kvmconf/libvirt-sock"
    hosts = {**cluster.site.hosts, "kvm1": dataclasses.replace(cluster.site.hosts["kvm1"], uri=nowhere)}
    broken = dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts))
    with connections(broken) as conns, pytest.raises(HostUnreachable, match=f"host 'kvm1': cannot connect to libvirt"
                                                                           f" at {re.escape(nowhere)}"):
        provision(broken, ["web", "cloud"], conns, log=quiet)
    assert domains_on(clean) == []
    assert [p for p in clean.images.rglob("*") if p.is_file()] == []


def test_a_uefi_cloud_vm_runs_from_its_overlay_with_the_seed_iso_attached(cluster: Cluster, clean: lab.Lab) -> None:
    with connections(cluster) as conns:
        provision(cluster, ["cloud"], conns, log=quiet)
        dom = conns.get("kvm1").lookupByName("cloud")
        assert dom.isActive()
        assert dom.blockInfo("vda")[0] == 2 * GIB
        assert dom.blockInfo("sda")[0] > 0  # the seed ISO, readable by QEMU
        assert ET.fromstring(dom.XMLDesc(0)).find("os/nvram") is not None  # OVMF's variables: it boots UEFI
        assert make_plan(cluster, [cluster.vm("cloud")], conns).vms[0].action is Action.KEEP
    overlay = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(clean.images / "kvm1" / "cloud.qcow2")],
                             capture_output=True, text=True, check=True).stdout
    assert f'"backing-filename": "{clean.base / "bookworm.qcow2"}"' in overlay


# --- LVM: a loop device stands in for the logical volume ------------------------------------------

class LoopLvm:
    """Runs commands for real, except that lvcreate/lvremove (recorded) make/remove a loop device at the LV's path.

    There is no device-mapper on these machines, so no real LV can exist; the loop device lets the
    domain run from a block device at /dev/<vg>/vm-<name>, exactly where the domain XML points.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.calls: list[list[str]] = []
        self.loops: dict[str, str] = {}  # device node -> loop device

    def __call__(self, argv: Sequence[str], stdin: bytes | None) -> Result:
        argv = list(argv)
        if argv[0] == "lvcreate":
            self.calls.append(argv)
            name, size, vg = argv[argv.index("-n") + 1], argv[argv.index("-L") + 1], argv[-1]
            backing = self.tmp_path / f"{vg}-{name}.img"
            subprocess.run(["truncate", "-s", size, str(backing)], check=True)
            loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                                  check=True).stdout.strip()
            node = Path("/dev", vg, name)
            node.parent.mkdir(exist_ok=True)
            node.symlink_to(loop)
            self.loops[str(node)] = loop
            return subprocess.CompletedProcess(argv, 0, b"", b"")
        if argv[0] == "vgs":
            return subprocess.CompletedProcess(argv, 0, f"  {argv[-1]}\n".encode(), b"")
        if argv[0] == "lvremove":
            self.calls.append(argv)
            vg, name = argv[-1].split("/")
            self.remove(str(Path("/dev", vg, name)))
            return subprocess.CompletedProcess(argv, 0, b"", b"")
        return subprocess.run(argv, input=stdin, capture_output=True, check=False)

    def remove(self, node: str) -> None:
        loop = self.loops.pop(node, None)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        Path(node).unlink(missing_ok=True)
        shutil.rmtree(Path(node).parent, ignore_errors=True)

    def cleanup(self) -> None:
        for node in list(self.loops):
            self.remove(node)


LVM_PREFIX = "kvmconftest"  # + the pytest process's PID: /dev/<this> of a killed run is removed at the next


def remove_stale_volume_groups() -> None:
    """Loop devices and /dev/kvmconftest<pid>/ links left by a killed run (whose pid is gone)."""
    for vg in Path("/dev").glob(f"{LVM_PREFIX}*"):
        owner = vg.name.removeprefix(LVM_PREFIX)
        if owner.isdigit() and not processes.alive(int(owner)):
            for node in vg.iterdir():
                if node.is_symlink() and os.readlink(node).startswith("/dev/loop"):
                    subprocess.run(["losetup", "-d", os.readlink(node)], check=False)
                node.unlink()
            vg.rmdir()


def test_an_lvm_vm_runs_from_the_block_device_lvcreate_made(cluster: Cluster, tmp_path: Path) -> None:
    require_tool("losetup")
    remove_stale_volume_groups()
    vg = f"{LVM_PREFIX}{os.getpid()}"  # unique: the device node lives in the machine's /dev
    # The example's kind of LVM VM (compute1: disk=lvm:vg0), at lab size.
    vol = dataclasses.replace(cluster.vm("db"), name="vol", mac="52:54:00:50:00:40", ip=IPv4Address("192.168.50.40"),
                              host="kvm1", disk=Disk(DiskKind.LVM, 1, vg), autostart=False)
    cluster = dataclasses.replace(cluster, vms=(*cluster.vms, vol))
    fake = LoopLvm(tmp_path)
    try:
        with connections(cluster, execute=fake) as conns:
            provision(cluster, ["vol"], conns, log=quiet)
            assert fake.calls == [["lvcreate", "--yes", "-n", "vm-vol", "-L", "1G", vg]]
            dom = conns.get("kvm1").lookupByName("vol")
            assert dom.isActive() and not dom.autostart()
            source = ET.fromstring(dom.XMLDesc(0)).find("devices/disk[@type='block']/source")
            assert source is not None and source.get("dev") == f"/dev/{vg}/vm-vol"
            assert dom.blockInfo("vda")[0] == GIB
            assert make_plan(cluster, [cluster.vm("vol")], conns).vms[0].action is Action.KEEP
            lifecycle.destroy(cluster, "vol", conns, purge=True, log=quiet)
            assert fake.calls[1:] == [["lvremove", "--yes", f"{vg}/vm-vol"]]
            assert not Path("/dev", vg).exists()
    finally:
        fake.cleanup()


# --- the lab's network and the example cluster --------------------------------------------------

def test_the_generated_dnsmasq_gives_a_pxe_vm_its_reserved_address_on_the_lab_bridge(
        cluster: Cluster, clean: lab.Lab) -> None:
    log = clean.dir / "dnsmasq.log"
    offset = log.stat().st_size
    with connections(cluster) as conns:
        provision(cluster, ["web"], conns, log=quiet)  # install=pxe: the NIC boots first
    deadline = time.monotonic() + 90
    ack = "DHCPACK(br0) 192.168.50.21 52:54:00:50:00:21 web"
    while time.monotonic() < deadline:
        with log.open() as f:
            f.seek(offset)
            if ack in f.read():
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"no {ack!r} in {log} within 90 s")
    # The tap libvirt made is in the lab's namespace, on its bridge; the machine's own network has no trace of it.
    links = subprocess.run(["ip", "netns", "exec", clean.netns, "ip", "-o", "link", "show", "master", "br0"],
                           capture_output=True, text=True, check=True).stdout
    assert "vnet" in links
    assert "fe:54:00:50:00:21" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_every_example_vm_defines_in_the_lab_without_a_diff(example: Cluster, clean: lab.Lab) -> None:
    cluster = lab.remap(example, clean)
    with connections(cluster) as conns:
        plan = make_plan(cluster, cluster.vms, conns)
        for p in plan.vms:
            domains.define(conns.get(p.vm.host), p.xml)
        again = make_plan(cluster, cluster.vms, conns)
    assert {p.vm.name: p.diff for p in again.vms} == {vm.name: [] for vm in cluster.vms}


# --- several physical hosts: one daemon each, placement, capacity, migration -------------------------

def append_vms(workdir: Path, *lines: str) -> None:
    with (workdir / "cluster.conf").open("a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_each_host_has_a_daemon_with_its_own_state_socket_and_uri(cluster: Cluster, clean: lab.Lab) -> None:
    assert clean.hosts == ["kvm0", "kvm1"]
    uris = {host: clean.uri_of(host) for host in clean.hosts}
    assert len(set(uris.values())) == 2 and all(clean.socket_of(host).is_socket() for host in clean.hosts)
    assert {name: h.uri for name, h in cluster.site.hosts.items()} == uris
    pids = [clean.pids["libvirtd"], clean.pids["libvirtd@kvm1"]]
    assert pids[0] != pids[1] and all(processes.alive(pid) and processes.in_netns(pid, clean.netns) for pid in pids)
    # each daemon sees its own /var/lib/libvirt: the bind mount of its host's directory
    roots = {os.stat(f"/proc/{pid}/root/var/lib/libvirt").st_ino for pid in pids}
    assert roots == {(clean.host_dir(host) / "libvirt" / "lib").stat().st_ino for host in clean.hosts}
    assert len(roots) == 2
    with connections(cluster) as conns:
        provision(cluster, ["web", "cloud"], conns, log=quiet)
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], ["cloud"])


def test_vms_placed_by_host_and_auto_run_on_both_hosts_and_status_and_capacity_show_both(
        workdir: Path, clean: lab.Lab) -> None:
    # kvm0 has web+db (288 MB), kvm1 cloud (128 MB): auto1 goes to kvm1 (more free RAM), then auto2 to kvm0.
    # The lab hosts have 2 CPUs each, all taken by web, db and cloud: allow 4 vCPUs per CPU.
    site = (workdir / "site.toml").read_text()
    (workdir / "site.toml").write_text(re.sub(r"(\[hosts\.kvm\d\]\n)", r"\1cpu_overcommit = 4.0\n", site))
    append_vms(workdir, "auto1\t52:54:00:50:00:41\t192.168.50.41\t256\t1\t1\t-\thost=auto install=none",
               "auto2\t52:54:00:50:00:42\t192.168.50.42\t256\t1\t1\t-\tinstall=none")
    done = invoke(workdir, clean, "provision", "--vm", "web", "--vm", "cloud", "--vm", "auto1", "--vm", "auto2")
    assert done.returncode == 0, done.stderr
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["auto2", "web"], ["auto1", "cloud"])
    status = invoke(workdir, clean, "status")
    assert status.returncode == 0, status.stderr
    sections = dict(re.findall(r"^(kvm\d) \(qemu\+unix:[^)]*\):\n((?:  .*\n?)*)", status.stdout, re.M))
    running = {host: sorted(re.findall(r"^  (\w+) +running", text, re.M)) for host, text in sections.items()}
    assert running == {"kvm0": ["auto2", "web"], "kvm1": ["auto1", "cloud"]}
    capacity = invoke(workdir, clean, "capacity")
    assert capacity.returncode == 0, capacity.stderr
    assert re.search(r"^kvm0 \(qemu\+unix:.*\): 3 VMs in cluster.conf, 2 defined, 2 running$", capacity.stdout, re.M)
    assert re.search(r"^kvm1 \(qemu\+unix:.*\): 2 VMs in cluster.conf, 2 defined, 2 running$", capacity.stdout, re.M)
    assert re.search(r"^  RAM +544 MB +of 4096 \(limit 4096 at overcommit 1: 13% used\)$", capacity.stdout, re.M)
    assert re.search(r"^  RAM +384 MB +of 4096 \(limit 4096 at overcommit 1: 9% used\)$", capacity.stdout, re.M)


def test_cold_migration_moves_the_disk_data_and_undefines_the_source_only_once_the_target_runs(
        workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "db").returncode == 0
    source = clean.images / "kvm0" / "db.img"
    pattern = os.urandom(1 << 20)
    with source.open("r+b") as disk:  # data the guest would have written
        disk.seek(1 << 30)
        disk.write(pattern)
    moved = invoke(workdir, clean, "migrate", "--vm", "db", "--to", "kvm1", "--cold", "--force", "--edit")
    assert moved.returncode == 0, moved.stderr
    target = clean.images / "kvm1" / "db.img"
    assert moved.stdout.splitlines() == [
        "db: powered off on kvm0", f"db: copied {source} to kvm1:{target}", "db: running on kvm1",
        f"db: undefined on kvm0; its files there are kept: {source}", f"{workdir / 'cluster.conf'}:4: set host=kvm1"]
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["db"])
    with lab_domain(clean, "kvm1", "db") as dom:
        assert dom.isActive() and dom.blockInfo("vda")[0] == 2 * GIB
        assert ET.fromstring(dom.XMLDesc(0)).find("devices/disk/source").get("file") == str(target)  # type: ignore[union-attr]
    with target.open("rb") as disk:
        disk.seek(1 << 30)
        assert disk.read(len(pattern)) == pattern
    assert target.stat().st_size == source.stat().st_size == 2 * GIB
    assert "db\t52:54:00:50:00:20\t192.168.50.20\t160\t2\t1\tlinux-servers,databases\thost=kvm1 disk=raw" \
        " install=none\n" in (workdir / "cluster.conf").read_text()
    status = invoke(workdir, clean, "status", "--host", "kvm1")
    assert re.search(r"^  db +running .* none$", status.stdout, re.M), status.stdout  # no drift: cluster.conf agrees
    again = invoke(workdir, clean, "migrate", "--vm", "db", "--to", "kvm1")
    assert (again.returncode, again.stderr) == (2, "kvmconf: db: cluster.conf places it on kvm1 already\n")


def test_live_migration_of_a_running_vm_copies_its_disk_while_it_runs(workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0  # qcow2, running
    with lab_domain(clean, "kvm0", "web") as dom:
        # Written by QEMU itself into the running guest's disk: what the guest would have written.
        command = 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x5a 1M 64k"'
        hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        assert libvirt_qemu.qemuMonitorCommand(dom, command, hmp).strip() == ""
    moved = invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm1")
    assert moved.returncode == 0, moved.stderr
    source, target = clean.images / "kvm0" / "web.qcow2", clean.images / "kvm1" / "web.qcow2"
    assert moved.stdout.splitlines()[:3] == [
        "web: migrating live to kvm1 (memory and disk) ...", "web: running on kvm1",
        f"web: undefined on kvm0; its files there are kept: {source}"]
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["web"])
    with lab_domain(clean, "kvm1", "web") as dom:
        assert dom.isActive() and dom.blockInfo("vda")[0] == GIB
        assert ET.fromstring(dom.XMLDesc(0)).find("devices/disk/source").get("file") == str(target)  # type: ignore[union-attr]
        persistent = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert persistent.find("devices/disk/source").get("file") == str(target)  # type: ignore[union-attr]
        domains.power_off(dom)
    check = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", str(target)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, check.stdout + check.stderr


def test_moving_a_vm_back_after_a_migrate_without_edit_is_said_step_by_step(workdir: Path, clean: lab.Lab) -> None:
    """The reviewer's way back: each refusal says where the VM is and what to do, and changes nothing."""
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0
    assert invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm1").returncode == 0  # cluster.conf: kvm0
    back = invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm0")
    assert (back.returncode, back.stderr) == (2, "kvmconf: web: cluster.conf places it on kvm0 already, but it is"
                                                 " defined on kvm1: to move it back, set host=kvm1 for it in"
                                                 " cluster.conf and run `invoke migrate --vm web --to kvm0 --edit`\n")
    conf = workdir / "cluster.conf"
    line = next(line for line in conf.read_text().splitlines() if line.startswith("web\t"))
    conf.write_text(conf.read_text().replace(line, line.replace("host=kvm0", "host=kvm1")))
    kept = clean.images / "kvm0" / "web.qcow2"  # what the first move left behind
    edit = invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm0", "--edit")
    assert (edit.returncode, edit.stderr) == (1, f"kvmconf: web: {kept} exists on kvm0 already and is never"
                                                 " overwritten; nothing was changed (a migration keeps the files it"
                                                 " moved away from: if this is what an earlier move of web off kvm0"
                                                 " left, remove it there and run this again)\n")
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["web"])
    kept.unlink()
    moved = invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm0", "--edit")
    assert moved.returncode == 0, moved.stderr
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert "host=kvm0" in next(line for line in conf.read_text().splitlines() if line.startswith("web\t"))


def test_a_migration_whose_target_has_the_disk_already_changes_nothing(workdir: Path, clean: lab.Lab) -> None:
    assert invoke(workdir, clean, "provision", "--vm", "db").returncode == 0
    (clean.images / "kvm1" / "db.img").write_bytes(b"someone else's")
    refused = invoke(workdir, clean, "migrate", "--vm", "db", "--to", "kvm1", "--cold", "--force")
    assert refused.returncode == 1
    assert refused.stderr == (f"kvmconf: db: {clean.images / 'kvm1' / 'db.img'} exists on kvm1 already and is never"
                              " overwritten; nothing was changed (a migration keeps the files it moved away from: if"
                              " this is what an earlier move of db off kvm1 left, remove it there and run this"
                              " again)\n")
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["db"], [])
    assert (clean.images / "kvm1" / "db.img").read_bytes() == b"someone else's"


def test_a_macvtap_nic_on_a_veth_interface_of_the_lab_runs(workdir: Path, clean: lab.Lab) -> None:
    # A veth pair stands for the host NIC (this kernel may lack the dummy driver); it lives in the lab's namespace.
    ns = ["ip", "netns", "exec", clean.netns]
    subprocess.run([*ns, "ip", "link", "add", "kvmdummy0", "type", "veth", "peer", "name", "kvmdummy1"], check=True)
    try:
        for end in ("kvmdummy0", "kvmdummy1"):
            subprocess.run([*ns, "ip", "link", "set", end, "up"], check=True)
        site = (workdir / "site.toml").read_text()
        site = site.replace("[hosts.kvm0]\n", '[hosts.kvm0]\ninterfaces = ["kvmdummy0"]\ncpu_overcommit = 2.0\n')
        (workdir / "site.toml").write_text(site)
        append_vms(workdir, "tap\t52:54:00:50:00:43\t192.168.50.43\t128\t1\t1\t-\thost=kvm0 install=none"
                            " nic=macvtap:kvmdummy0:bridge")
        done = invoke(workdir, clean, "provision", "--vm", "tap")
        assert done.returncode == 0, done.stderr
        with lab_domain(clean, "kvm0", "tap") as dom:
            assert dom.isActive()
            nic = ET.fromstring(dom.XMLDesc(0)).find("devices/interface[@type='direct']")
            assert nic is not None and nic.find("source").attrib == {"dev": "kvmdummy0", "mode": "bridge"}  # type: ignore[union-attr]
            assert nic.find("mac").get("address") == "56:54:00:50:00:43"  # type: ignore[union-attr]
            device = nic.find("target").get("dev")  # type: ignore[union-attr]
        links = subprocess.run([*ns, "ip", "-d", "-o", "link", "show", "dev", str(device)], capture_output=True,
                               text=True, check=True).stdout
        assert "@kvmdummy0" in links and "macvtap mode bridge" in links and "56:54:00:50:00:43" in links
    finally:
        _empty(clean)
        subprocess.run([*ns, "ip", "link", "del", "kvmdummy0"], check=False)


def test_a_pinned_vm_runs_with_its_vcpu_and_emulator_threads_where_site_toml_says(
        workdir: Path, clean: lab.Lab) -> None:
    site = (workdir / "site.toml").read_text()
    (workdir / "site.toml").write_text(site.replace("[hosts.kvm1]\n", '[hosts.kvm1]\nhousekeeping_cpus = "0"\n'
                                                                      "cpu_overcommit = 2.0\n"))
    append_vms(workdir, "pin\t52:54:00:50:00:44\t192.168.50.44\t128\t1\t1\t-\thost=kvm1 install=none cpuset=1")
    done = invoke(workdir, clean, "provision", "--vm", "pin")
    assert done.returncode == 0, done.stderr
    with lab_domain(clean, "kvm1", "pin") as dom:
        assert dom.isActive()
        def on(cpumap: Sequence[bool]) -> list[int]:
            return [cpu for cpu, pinned in enumerate(cpumap) if pinned]

        assert [on(m) for m in dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)] == [[1]]  # vCPU 0 on host CPU 1
        assert on(dom.emulatorPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)) == [0]  # QEMU's own threads on CPU 0


# --- the lab itself ---------------------------------------------------------------------------------

def test_lab_up_and_down_stop_exactly_what_was_started(workdir: Path, tmp_path: Path) -> None:
    require_lab()
    directory, netns = tmp_path / "lab", f"{NETNS_PREFIX}{os.getpid()}-updown"
    up = invoke(workdir, None, "lab.up", "--dir", str(directory), "--netns", netns)
    try:
        assert up.returncode == 0, up.stderr
        assert f"act on the lab with: export KVMCONF_LAB={directory}" in up.stdout
        started = lab.Lab.load(directory)
        assert started is not None and started.hosts == ["kvm0", "kvm1"]
        daemons = {"reaper", "virtlogd", "libvirtd", "reaper@kvm1", "virtlogd@kvm1", "libvirtd@kvm1", "dnsmasq"}
        assert daemons <= set(started.pids)
        assert all(processes.alive(pid) and processes.in_netns(pid, netns) for pid in started.pids.values())
        assert invoke(workdir, started, "provision", "--vm", "db").returncode == 0
        qemus = set(lab.netns_pids(netns)) - set(started.pids.values())
        assert len(qemus) == 1  # the VM's QEMU, started by the lab's libvirtd inside the namespace
        down = invoke(workdir, None, "lab.down", "--dir", str(directory))
        assert down.returncode == 0, down.stderr
        for name in ("dnsmasq", "libvirtd", "virtlogd", "libvirtd@kvm1", "virtlogd@kvm1"):
            assert f"lab: stopped {name} ({started.pids[name]})" in down.stdout
        assert "left in the namespace" not in down.stdout  # the VM was powered off through libvirt first
        assert not any(processes.alive(pid) for pid in [*started.pids.values(), *qemus])
        assert not lab.netns_exists(netns)
        assert [p.name for p in directory.iterdir()] == ["base"]
        assert invoke(workdir, None, "lab.down", "--dir", str(directory)).stdout == f"no lab in {directory}\n"
    finally:
        leftover = lab.Lab.load(directory)
        if leftover is not None:
            lab.teardown(leftover, quiet)


def test_lab_up_in_a_directory_of_other_files_refuses_and_leaves_them(workdir: Path, tmp_path: Path) -> None:
    """A mistyped --dir or KVMCONF_LAB (., ~, a repository) once lost everything in it when up failed."""
    require_lab()
    directory, netns = tmp_path / "labwipe", f"{NETNS_PREFIX}{os.getpid()}-wipe"
    (directory / "mydata").mkdir(parents=True)
    (directory / "precious.txt").write_text("important\n")
    bad_name = invoke(workdir, None, "lab.up", "--dir", str(directory), "--netns", "bad/name")
    assert bad_name.returncode == 1
    assert bad_name.stderr == ("kvmconf: network namespace name 'bad/name': use letters, digits, '_', '.' and '-'"
                               " (not first), at most 255 characters (`ip netns` refuses '/', '.' and '..'), e.g."
                               " kvmconf-lab\n")
    foreign = invoke(workdir, None, "lab.up", "--dir", str(directory), "--netns", netns)
    assert foreign.returncode == 1
    assert foreign.stderr == (f"kvmconf: lab directory {directory} holds mydata, precious.txt and no .kvmconf-lab (it"
                              " is no lab's): a lab starts only in a new or empty directory, or one a lab made; give"
                              " --dir (or KVMCONF_LAB) another one (default /var/tmp/kvmconf-lab)\n")
    assert not lab.netns_exists(netns)
    assert sorted(p.name for p in directory.iterdir()) == ["mydata", "precious.txt"]
    assert (directory / "precious.txt").read_text() == "important\n"


def test_a_killed_runs_namespace_is_removed_at_the_next_start() -> None:
    require_lab()
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{NETNS_PREFIX}{dead.pid}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in lab.remove_stale_netns(NETNS_PREFIX)
        assert not lab.netns_exists(name)
        assert f"{NETNS_PREFIX}{os.getpid()}" not in lab.remove_stale_netns(NETNS_PREFIX)
    finally:
        if lab.netns_exists(name):
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_lab_up_on_a_running_lab_refuses_another_namespace_or_kvm_and_refreshes_it_as_it_is(
        workdir: Path, clean: lab.Lab) -> None:
    """A running lab cannot change namespace or domain type: up used to ignore --netns and --kvm, saying nothing."""
    running = (f"kvmconf: a lab is up in {clean.dir} already, in namespace {clean.netns} with domain type qemu:"
               " {} needs a new lab; stop this one with `invoke lab.down --dir " f"{clean.dir}` first, or start another"
               " with --dir\n")
    other = invoke(workdir, None, "lab.up", "--dir", str(clean.dir), "--netns", "kvmconf-test-other")
    assert (other.returncode, other.stderr) == (1, running.format("--netns kvmconf-test-other"))
    kvm = invoke(workdir, None, "lab.up", "--dir", str(clean.dir), "--kvm")
    assert (kvm.returncode, kvm.stderr) == (1, running.format("--kvm"))
    assert not lab.netns_exists("kvmconf-test-other")
    for same in ((), ("--netns", clean.netns)):  # no --netns: the running lab's, not the default kvmconf-lab
        again = invoke(workdir, None, "lab.up", "--dir", str(clean.dir), *same)
        assert again.returncode == 0, again.stderr
        assert f"lab already up in {clean.dir} (namespace {clean.netns}); dnsmasq files refreshed\n" in again.stdout
    refreshed = lab.Lab.load(clean.dir)
    assert refreshed is not None
    assert (refreshed.netns, refreshed.kvm, refreshed.pids["libvirtd"]) == (clean.netns, False, clean.pids["libvirtd"])
    clean.pids.update(refreshed.pids)  # a refresh may restart dnsmasq: the module's teardown stops it by its new PID


def test_options_reach_the_lab_through_the_tasks(workdir: Path, clean: lab.Lab) -> None:
    dry = invoke(workdir, clean, "provision", "--all", "--dry-run", "--no-start")
    assert dry.returncode == 0, dry.stderr
    assert "  + web  create qcow2 disk" in dry.stdout and "; autostart on\n" in dry.stdout
    assert domains_on(clean) == []
    assert Options().start and not Options().apply
