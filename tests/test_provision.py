"""Provisioning logic on libvirt's test:///default driver: no daemon, disks made by qemu-img in tmp_path.

The example cluster is used as it is, except that every host's URI is the test driver and its
disk_dir a temporary directory (sizes do not matter: qcow2 and raw disks are thin).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import cast

import libvirt
import pytest

from generators import cloud_init
from generators.model import Cluster, DiskKind, DomainType
from kvmconf import disks, domains, lab, lifecycle
from kvmconf.connection import Connections, connections
from kvmconf.defined import Domain, Inventory
from kvmconf.errors import (
    DiskExists,
    HostUnreachable,
    KvmconfError,
    ProvisionBlocked,
    ProvisionFailed,
    UnknownHost,
    UnknownVm,
    WrongUsage,
)
from kvmconf.plan import Action, find_host, find_vm, find_vms, format_plan, make_plan, select, select_or_all
from kvmconf.provision import Options, provision
from kvmconf.runner import Result, Runner, runner_for_uri
from tests.tools import require_tool

TEST_URI = "test:///default"
NOWHERE = "qemu+unix:///system?socket=/nonexistent/kvmconf-test/libvirt-sock"


def on_test_driver(cluster: Cluster, tmp_path: Path, uris: dict[str, str] | None = None) -> Cluster:
    """The cluster with every host on test:///default (or ``uris``) and its disks under tmp_path.

    test:///default keeps its domains while any connection to it is open in this process. An earlier test's
    connection held by a reference cycle (a traceback kept by pytest.raises) stays open until the garbage collector
    runs, and with it that test's domains: collected here, each test starts from the driver's own state.
    """
    require_tool("qemu-img")
    gc.collect()
    site = cluster.site
    hosts = {}
    for name, host in site.hosts.items():
        (tmp_path / name).mkdir(exist_ok=True)
        hosts[name] = dataclasses.replace(host, uri=(uris or {}).get(name, TEST_URI), disk_dir=str(tmp_path / name))
    base = tmp_path / "base.qcow2"
    if not base.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    oses = {name: dataclasses.replace(o, cloud_image=str(base)) for name, o in site.oses.items()}
    return dataclasses.replace(cluster, site=dataclasses.replace(site, hosts=hosts, oses=oses))


class Recorder:
    """Runs commands for real, except LVM's (recorded; CI machines have no device-mapper) and injected failures."""

    def __init__(self, fail_on: str | None = None, on_call: str | None = None,
                 action: object = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.on_call, self.action = on_call, action

    def __call__(self, argv: Sequence[str], stdin: bytes | None) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        joined = " ".join(argv)
        if self.on_call and self.on_call in joined and callable(self.action):
            self.action()
        if self.fail_on and argv[0] == "qemu-img" and self.fail_on in joined:
            return subprocess.CompletedProcess(argv, 1, b"", b"qemu-img: injected failure")
        if argv[0] in ("lvcreate", "lvremove", "vgs"):
            return subprocess.CompletedProcess(argv, 0, b"", b"")
        return subprocess.run(argv, input=stdin, capture_output=True, check=False)


@pytest.fixture
def cluster(example: Cluster, tmp_path: Path) -> Cluster:
    return on_test_driver(example, tmp_path)


@pytest.fixture
def conns(cluster: Cluster) -> Iterator[Connections]:
    with connections(cluster, execute=Recorder()) as opened:
        yield opened


def quiet(_line: str) -> None:
    pass


def qemu_info(path: str) -> dict[str, object]:
    result = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, check=True)
    info: dict[str, object] = json.loads(result.stdout)
    return info


def domain_names(conn: libvirt.virConnect) -> set[str]:
    return {dom.name() for dom in conn.listAllDomains()}


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# --- connections and command runners ----------------------------------------------------------

def test_each_uri_is_opened_once_for_the_hosts_that_share_it(cluster: Cluster) -> None:
    opened: list[str] = []

    def opener(uri: str) -> libvirt.virConnect:
        opened.append(uri)
        return libvirt.open(uri)

    with connections(cluster, opener) as conns:
        assert conns.get("kvm0") is conns.get("kvm1")
        assert conns.hosts_sharing_uri("kvm0") == {"kvm0", "kvm1"}
    assert opened == [TEST_URI]


def test_an_unreachable_uri_names_the_host_the_uri_and_the_setting(example: Cluster, tmp_path: Path) -> None:
    cluster = on_test_driver(example, tmp_path, {"kvm1": NOWHERE})
    with connections(cluster) as conns, pytest.raises(HostUnreachable) as err:
        conns.get("kvm1")
    message = str(err.value)
    assert f"host 'kvm1': cannot connect to libvirt at {NOWHERE}" in message
    assert "[hosts.kvm1] uri in site.toml" in message


def test_the_plans_summary_counts_the_vms_an_unreachable_host_left_unplanned(example: Cluster,
                                                                             tmp_path: Path) -> None:
    # With every host unreachable, `invoke plan` ended "0 to create, 0 to change, 0 unchanged": as if none were asked.
    cluster = on_test_driver(example, tmp_path, {"kvm1": NOWHERE})
    on_kvm1 = sum(1 for vm in cluster.vms if vm.host == "kvm1")
    with connections(cluster) as conns:
        plan = make_plan(cluster, cluster.vms, conns, strict=False)
    summary = format_plan(plan).splitlines()[-1]
    assert summary == f"{len(cluster.vms) - on_kvm1} to create, 0 to change, 0 unchanged, {on_kvm1} not planned (see !)"
    assert on_kvm1 > 0


def test_commands_run_locally_for_local_uris_and_over_ssh_for_remote_ones() -> None:
    for uri in ("qemu:///system", TEST_URI, "qemu+unix:///system?socket=/tmp/x/libvirt-sock",
                "qemu+ssh://root@localhost/system", "qemu+ssh://root@127.0.0.2/system"):  # loopback: this machine
        assert runner_for_uri(uri).argv(["qemu-img", "info", "x"]) == ["qemu-img", "info", "x"]
    remote = runner_for_uri("qemu+ssh://root@kvm1.phys.example.org/system")
    assert remote.argv(["qemu-img", "create", "/var/lib/a b.img", "1G"]) == [
        "ssh", "-o", "BatchMode=yes", "root@kvm1.phys.example.org", "--", "qemu-img create '/var/lib/a b.img' 1G"]
    assert runner_for_uri("qemu+ssh://kvm2:2222/system").argv(["true"])[:5] == ["ssh", "-o", "BatchMode=yes",
                                                                                 "-p", "2222"]


def test_a_missing_command_is_reported_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(KvmconfError, match="localhost: `no-such-tool-kvmconf x` failed with exit status 127:"
                                           " no-such-tool-kvmconf: command not found"):
        Runner().check(["no-such-tool-kvmconf", "x"])


def test_which_disks_exist_is_asked_in_one_command_per_host(tmp_path: Path) -> None:
    (tmp_path / "a b.qcow2").touch()
    (tmp_path / "c.img").touch()
    recorder = Recorder()
    paths = [str(tmp_path / name) for name in ("a b.qcow2", "c.img", "missing.img")]
    assert Runner(execute=recorder).existing(paths) == set(paths[:2])
    assert len(recorder.calls) == 1


# --- disks -------------------------------------------------------------------------------------

def test_lvcreate_is_called_with_exactly_these_arguments(example: Cluster) -> None:
    disk = disks.disk_spec(example, example.vm("compute1"))
    assert disk.path == "/dev/vg0/vm-compute1"
    assert disks.lvcreate_argv(disk) == ["lvcreate", "--yes", "-n", "vm-compute1", "-L", "100G", "vg0"]
    assert disks.lvremove_argv(disk) == ["lvremove", "--yes", "vg0/vm-compute1"]


def test_thin_qcow2_raw_and_overlay_disks_have_the_size_of_cluster_conf(cluster: Cluster) -> None:
    runner = Runner(execute=Recorder())
    for name, fmt in (("mcp", "qcow2"), ("db", "raw"), ("provision", "qcow2")):
        disk = disks.disk_spec(cluster, cluster.vm(name))
        disks.create(runner, disk)
        info = qemu_info(disk.path)
        assert (info["format"], info["virtual-size"]) == (fmt, cluster.vm(name).disk.size_gb * disks.GIB)
        assert info["actual-size"] < 10 * 2**20  # type: ignore[operator]  # thin: nothing allocated up front
    overlay = qemu_info(disks.disk_spec(cluster, cluster.vm("provision")).path)
    assert overlay["backing-filename"] == cluster.os_of(cluster.vm("provision")).cloud_image
    assert not list(Path(cluster.site.hosts["kvm0"].disk_dir).glob("*.kvmconf-new"))


def test_an_existing_disk_is_never_overwritten(cluster: Cluster) -> None:
    disk = disks.disk_spec(cluster, cluster.vm("db"))
    Path(disk.path).write_bytes(b"precious")
    with pytest.raises(DiskExists, match=f"db: its disk {disk.path} already exists"):
        disks.create(Runner(), disk)
    assert Path(disk.path).read_bytes() == b"precious"


def test_an_overlay_smaller_than_its_base_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    small = dataclasses.replace(disks.disk_spec(cluster, cluster.vm("provision")), size_gb=0)
    with pytest.raises(KvmconfError, match=r"provision: disk size 0 GB is smaller than its base image .*base.qcow2"
                                           r" \(1.0 GB\); give it at least 1 GB in cluster.conf"):
        disks.create(Runner(), small)


def test_a_missing_base_image_stops_the_run_before_anything_is_created(cluster: Cluster, conns: Connections,
                                                                      tmp_path: Path) -> None:
    # It was found only when its overlay was made: after the VMs before it in cluster.conf had been created (and
    # were then undone), and `invoke plan` did not show it. One check per base image and host, for every VM using it.
    none = tmp_path / "none.qcow2"
    site = dataclasses.replace(cluster.site, oses={name: dataclasses.replace(o, cloud_image=str(none))
                                                   for name, o in cluster.site.oses.items()})
    missing = dataclasses.replace(cluster, site=site)
    before = domain_names(conns.get("kvm0"))
    with pytest.raises(ProvisionBlocked) as err:
        provision(missing, ["ldap", "login", "provision"], conns, log=quiet)
    failure = (f"localhost: `qemu-img info {none}` failed with exit status 1: qemu-img: Could not open '{none}':"
               f" Could not open '{none}': No such file or directory")
    assert str(err.value).splitlines() == [
        f"provision, login: base image {none} for their install=cloud overlays is not usable on kvm0 (put the OS's"
        f" cloud image there, or fix cloud_image in site.toml): {failure}",
        "nothing was changed"]
    assert files_under(tmp_path / "kvm0") == files_under(tmp_path / "kvm1") == set()
    assert domain_names(conns.get("kvm0")) == before
    small = dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, disk=dataclasses.replace(vm.disk, size_gb=0)) if vm.install.value == "cloud" else vm
        for vm in cluster.vms))
    assert make_plan(small, [small.vm("ldap"), small.vm("provision")], conns, strict=False).hosts[0].problems == [
        f"provision: disk size 0 GB is smaller than its base image {tmp_path / 'base.qcow2'} (1.0 GB); give it at"
        " least 1 GB in cluster.conf"]


def test_a_missing_base_image_is_named(cluster: Cluster, tmp_path: Path) -> None:
    disk = dataclasses.replace(disks.disk_spec(cluster, cluster.vm("provision")), backing=str(tmp_path / "none.qcow2"))
    with pytest.raises(KvmconfError, match=r"provision: base image .*none.qcow2 for its install=cloud overlay is not"
                                           " usable on localhost"):
        disks.create(Runner(), disk)


# --- comparing definitions ---------------------------------------------------------------------

GENERATED = """<domain type='qemu'><name>a</name><uuid>00000000-0000-0000-0000-000000000001</uuid>
<memory unit='MiB'>128</memory><vcpu placement='static'>1</vcpu>
<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><firmware><feature enabled='no' name='secure-boot'/>
<feature enabled='no' name='enrolled-keys'/></firmware><boot dev='network'/><boot dev='hd'/></os>
<devices><disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/></interface>
<controller type='usb' model='none'/></devices></domain>"""
# What libvirt makes of it: KiB, canonical machine, features re-sorted, controllers and addresses added.
DEFINED = """<domain type='qemu'><name>a</name><uuid>5a5a5a5a-0000-0000-0000-000000000001</uuid>
<memory unit='KiB'>131072</memory><currentMemory unit='KiB'>131072</currentMemory><vcpu placement='static'>1</vcpu>
<os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><firmware>
<feature enabled='no' name='enrolled-keys'/><feature enabled='no' name='secure-boot'/></firmware>
<boot dev='network'/><boot dev='hd'/></os>
<devices><controller type='sata' index='0'/><controller type='usb' index='0' model='none'/>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/>
<target dev='vda' bus='virtio'/><address type='pci' bus='0x03'/></disk>
<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><model type='virtio'/>
<address type='pci' bus='0x01'/></interface></devices></domain>"""
ALIASES = {("x86_64", "q35"): "pc-q35-7.2"}


def test_what_libvirt_adds_or_reorders_is_no_difference() -> None:
    assert domains.definition_diff(DEFINED, GENERATED, ALIASES, "a") == []


def test_a_changed_value_is_shown_as_a_diff_of_that_line() -> None:
    changed = DEFINED.replace("<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>2</vcpu>")
    diff = domains.definition_diff(changed, GENERATED, ALIASES, "a")
    assert [line for line in diff if line[0] in "+-" and line[:3] not in ("---", "+++")] == [
        '-  <vcpu placement="static">2</vcpu>', '+  <vcpu placement="static">1</vcpu>']


def test_boot_order_is_compared_by_position() -> None:
    swapped = DEFINED.replace("<boot dev='network'/><boot dev='hd'/>", "<boot dev='hd'/><boot dev='network'/>")
    assert domains.definition_diff(swapped, GENERATED, ALIASES, "a") != []


def test_a_disk_added_by_hand_shows_as_a_removal() -> None:
    extra = DEFINED.replace("</devices>", "<disk type='file' device='disk'><source file='/extra.img'/>"
                                          "<target dev='vdb' bus='virtio'/><address type='pci'/></disk></devices>")
    diff = domains.definition_diff(extra, GENERATED, ALIASES, "a")
    assert "-      <source file=\"/extra.img\" />" in diff
    assert not any("address" in line for line in diff)


def test_the_uuid_of_a_defined_domain_is_kept() -> None:
    xml = domains.with_uuid(GENERATED, "5a5a5a5a-0000-0000-0000-000000000001")
    assert domains.uuid_of(xml) == "5a5a5a5a-0000-0000-0000-000000000001"
    assert domains.with_uuid(GENERATED, "00000000-0000-0000-0000-000000000001") is GENERATED


# --- provisioning on the test driver -----------------------------------------------------------

def test_provision_creates_disks_and_running_domains_with_the_values_of_cluster_conf(
        cluster: Cluster, conns: Connections) -> None:
    lines: list[str] = []
    provision(cluster, ["web", "db"], conns, log=lines.append)
    conn = conns.get("kvm0")
    for name, fmt in (("web", "qcow2"), ("db", "raw")):
        vm = cluster.vm(name)
        dom = conn.lookupByName(name)
        state, max_kib, _, cpus, _ = dom.info()
        assert (state, max_kib, cpus) == (libvirt.VIR_DOMAIN_RUNNING, vm.ram_mb * 1024, vm.cpus)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert root.find("devices/interface/mac").get("address") == vm.mac  # type: ignore[union-attr]
        assert root.find("devices/disk/source").get("file") == disks.disk_spec(cluster, vm).path  # type: ignore[union-attr]
        assert bool(dom.autostart()) == vm.autostart
        info = qemu_info(disks.disk_spec(cluster, vm).path)
        assert (info["format"], info["virtual-size"]) == (fmt, vm.disk.size_gb * disks.GIB)
    assert "db: created raw disk" in "\n".join(lines)
    assert lines[-1] == "2 created, 0 to change (shown, not applied), 0 unchanged"
    again: list[str] = []
    provision(cluster, ["web", "db"], conns, log=again.append)
    assert again == ["db: no change", "web: no change", "0 created, 0 to change (shown, not applied), 2 unchanged"]


def test_a_ram_change_is_shown_as_exactly_that_diff_and_applied_only_with_apply(
        cluster: Cluster, conns: Connections) -> None:
    provision(cluster, ["ldap"], conns, log=quiet)
    uuid = conns.get("kvm0").lookupByName("ldap").UUIDString()
    bigger = dataclasses.replace(cluster, vms=tuple(dataclasses.replace(vm, ram_mb=1536) if vm.name == "ldap" else vm
                                                   for vm in cluster.vms))
    plan = make_plan(bigger, [bigger.vm("ldap")], conns)
    [p] = plan.vms
    assert p.action is Action.CHANGE
    assert [line for line in p.diff if line[0] in "+-" and line[:3] not in ("---", "+++")] == [
        '-  <memory unit="KiB">1048576</memory>', '-  <currentMemory unit="KiB">1048576</currentMemory>',
        '+  <memory unit="KiB">1572864</memory>', '+  <currentMemory unit="KiB">1572864</currentMemory>']
    shown: list[str] = []
    provision(bigger, ["ldap"], conns, log=shown.append)
    assert shown[0] == "ldap: definition differs from cluster.conf (not applied; run again with --apply):"
    assert conns.get("kvm0").lookupByName("ldap").maxMemory() == 1048576
    provision(bigger, ["ldap"], conns, Options(apply=True), log=quiet)
    dom = conns.get("kvm0").lookupByName("ldap")
    assert ET.fromstring(domains.inactive_xml(dom)).findtext("memory") == "1572864"
    assert dom.UUIDString() == uuid
    assert make_plan(bigger, [bigger.vm("ldap")], conns).vms[0].action is Action.KEEP


def test_a_defined_vm_whose_disk_moved_in_cluster_conf_is_never_given_an_empty_one(
        cluster: Cluster, conns: Connections) -> None:
    # disk=qcow2 -> disk=raw (or another disk_dir) for a VM that exists: the new path has no disk, and making an
    # empty one there (and, with --apply, pointing the domain at it) would leave the VM without its data.
    provision(cluster, ["ldap"], conns, Options(start=False), log=quiet)
    kvm0 = Path(cluster.site.hosts["kvm0"].disk_dir)
    raw = dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, disk=dataclasses.replace(vm.disk, kind=DiskKind.RAW)) if vm.name == "ldap" else vm
        for vm in cluster.vms))
    before = domains.inactive_xml(conns.get("kvm0").lookupByName("ldap"))
    expected = (f"ldap: its domain's disk is {kvm0 / 'ldap.qcow2'}, but cluster.conf now puts its disk at"
                f" {kvm0 / 'ldap.img'}, where there is none: provision never moves or converts a disk, and would give"
                " ldap a new, empty one; to keep its data, put the disk there by hand (mv, qemu-img convert) and run"
                " again, or change disk= (or disk_dir) back; for an empty disk, `invoke destroy --vm ldap` first (it"
                " keeps the old disk)")
    for options in (Options(), Options(apply=True)):
        with pytest.raises(ProvisionBlocked) as err:
            provision(raw, ["ldap"], conns, options, log=quiet)
        assert str(err.value) == expected + "\nnothing was changed"
        assert files_under(kvm0) == {"ldap.qcow2"}
        assert domains.inactive_xml(conns.get("kvm0").lookupByName("ldap")) == before
    shown = format_plan(make_plan(raw, [raw.vm("ldap")], conns, strict=False))
    assert f"  ! {expected}\n" in shown
    stop = f"STOP: disk {kvm0 / 'ldap.img'} is missing, and its domain's disk is {kvm0 / 'ldap.qcow2'} (see !)"
    assert f"\n      {stop}\n" in shown
    # Once the admin has put the disk there, the new definition is an ordinary change.
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(kvm0 / "ldap.qcow2"), str(kvm0 / "ldap.img")], check=True)
    provision(raw, ["ldap"], conns, Options(apply=True), log=quiet)
    sources = domains.disk_sources(domains.inactive_xml(conns.get("kvm0").lookupByName("ldap")))
    assert sources == {"vda": str(kvm0 / "ldap.img")}


def test_a_disk_size_raised_in_cluster_conf_is_named_not_called_no_change(cluster: Cluster,
                                                                          conns: Connections) -> None:
    provision(cluster, ["ldap"], conns, Options(start=False), log=quiet)
    disk = Path(cluster.site.hosts["kvm0"].disk_dir) / "ldap.qcow2"
    bigger = dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, disk=dataclasses.replace(vm.disk, size_gb=25)) if vm.name == "ldap" else vm
        for vm in cluster.vms))
    note = (f"note: disk {disk} is 10 GB, cluster.conf says 25: provision never resizes a disk; resize it by hand"
            " (virsh blockresize, lvextend; then the guest's partition and file system), or make cluster.conf say its"
            " size")
    assert format_plan(make_plan(bigger, [bigger.vm("ldap")], conns)).splitlines()[1:3] == [
        "  = ldap  no change", f"      {note}"]
    lines: list[str] = []
    provision(bigger, ["ldap"], conns, Options(apply=True), log=lines.append)
    assert lines == ["ldap: no change", f"    {note}", "0 created, 0 changed, 1 unchanged"]
    assert qemu_info(str(disk))["virtual-size"] == 10 * disks.GIB
    lines.clear()
    provision(cluster, ["ldap"], conns, log=lines.append)  # the size of cluster.conf: nothing to note
    assert lines == ["ldap: no change", "0 created, 0 to change (shown, not applied), 1 unchanged"]


def test_a_domain_defined_by_hand_keeps_its_uuid(cluster: Cluster, conns: Connections) -> None:
    vm = cluster.vm("mcp")
    own = "5a5a5a5a-1111-2222-3333-444444444444"
    xml = domains.with_uuid(make_plan(cluster, [vm], conns).vms[0].xml, own)
    conns.get("kvm0").defineXML(xml.replace("<vcpu placement=\"static\">2</vcpu>", "<vcpu>1</vcpu>"))
    [p] = make_plan(cluster, [vm], conns).vms
    assert p.uuid_kept == own and p.action is Action.CHANGE
    provision(cluster, ["mcp"], conns, Options(apply=True), log=quiet)
    dom = conns.get("kvm0").lookupByName("mcp")
    assert dom.UUIDString() == own and dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CONFIG) == vm.cpus


def test_a_domain_defined_as_generated_under_its_own_uuid_only_gets_its_missing_disk(
        cluster: Cluster, conns: Connections) -> None:
    # Keeping a UUID is no change (the XML to define carries it): only the disk was missing, and it is made.
    own = "5a5a5a5a-1111-2222-3333-444444444444"
    dom = conns.get("kvm0").defineXML(domains.with_uuid(make_plan(cluster, [cluster.vm("ldap")], conns).vms[0].xml,
                                                         own))
    dom.setAutostart(cluster.vm("ldap").autostart)
    disk = Path(cluster.site.hosts["kvm0"].disk_dir) / "ldap.qcow2"
    lines: list[str] = []
    provision(cluster, ["ldap"], conns, log=lines.append)
    assert lines == [f"ldap: created qcow2 disk {disk} (10 GB, thin)",
                     "0 created, 1 changed, 0 to change (shown, not applied), 0 unchanged"]
    assert disk.exists() and conns.get("kvm0").lookupByName("ldap").UUIDString() == own
    # With a real change too: the disk made first is not listed again among the changes still to apply.
    disk.unlink()
    bigger = dataclasses.replace(cluster, vms=tuple(dataclasses.replace(vm, ram_mb=1536) if vm.name == "ldap" else vm
                                                   for vm in cluster.vms))
    lines.clear()
    provision(bigger, ["ldap"], conns, log=lines.append)
    assert lines[:3] == [f"ldap: created qcow2 disk {disk} (10 GB, thin)",
                         "ldap: definition differs from cluster.conf (not applied; run again with --apply):",
                         f"    keeps its UUID {own} (not the generated one)"]
    assert not [line for line in lines if "is missing" in line]
    assert lines[-1] == "0 created, 1 to change (shown, not applied), 0 unchanged"


def test_a_cloud_vm_gets_an_overlay_and_its_seed_iso(cluster: Cluster, conns: Connections) -> None:
    provision(cluster, ["provision"], conns, log=quiet)
    vm = cluster.vm("provision")
    seed = Path(cluster.site.hosts["kvm0"].disk_dir) / "provision-seed.iso"
    assert seed.read_bytes() == cloud_init.render(cluster)[Path("cloud-init/provision.iso")]  # type: ignore[index]
    sources = [s.get("file") for s in ET.fromstring(domains.inactive_xml(conns.get("kvm0").lookupByName("provision")))
               .iterfind("devices/disk/source")]
    assert sources == [disks.disk_spec(cluster, vm).path, str(seed)]


def test_an_existing_disk_stops_the_run_before_anything_is_created(cluster: Cluster, conns: Connections) -> None:
    kvm0 = Path(cluster.site.hosts["kvm0"].disk_dir)
    (kvm0 / "db.img").write_bytes(b"precious")
    before = domain_names(conns.get("kvm0"))
    with pytest.raises(ProvisionBlocked) as err:
        provision(cluster, ["ldap", "db"], conns, log=quiet)
    assert str(err.value) == (f"db: its disk {kvm0 / 'db.img'} already exists and is never overwritten; attach it as it"
                              " is with --reuse-disk, or remove it with `invoke destroy --vm db --purge` if it is a"
                              " leftover\nnothing was changed")
    assert files_under(kvm0) == {"db.img"} and (kvm0 / "db.img").read_bytes() == b"precious"
    assert domain_names(conns.get("kvm0")) == before
    provision(cluster, ["db"], conns, Options(reuse_disk=True), log=quiet)
    assert (kvm0 / "db.img").read_bytes() == b"precious" and "db" in domain_names(conns.get("kvm0"))


def test_a_disk_dir_missing_on_its_host_stops_the_run_before_anything_is_created(
        cluster: Cluster, conns: Connections) -> None:
    """qemu-img failed on it only once the VMs before were made (and started), which the run then undid."""
    missing = Path(cluster.site.hosts["kvm1"].disk_dir) / "not-made"
    hosts = {**cluster.site.hosts, "kvm1": dataclasses.replace(cluster.site.hosts["kvm1"], disk_dir=str(missing))}
    moved = dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts),
                                vms=tuple(dataclasses.replace(vm, host="kvm1") if vm.name in ("web", "scratch") else vm
                                          for vm in cluster.vms))
    before = domain_names(conns.get("kvm0"))
    with pytest.raises(ProvisionBlocked) as err:
        provision(moved, ["ldap", "web", "scratch"], conns, log=quiet)
    assert str(err.value) == (f"web, scratch: the directory {missing} for their disks is not on kvm1; create it there"
                              f" (`fab kvm-setup` does), or fix disk_dir of [hosts.kvm1] in {cluster.site.path}"
                              "\nnothing was changed")
    assert domain_names(conns.get("kvm0")) == before
    assert files_under(Path(cluster.site.hosts["kvm0"].disk_dir)) == set() and not missing.exists()
    plan = make_plan(moved, [moved.vm("web")], conns, strict=False)
    assert f"  ! web: the directory {missing} for its disk is not on kvm1; create it there" in format_plan(plan)


def test_a_failing_disk_create_midway_removes_what_the_run_created_and_nothing_else(
        example: Cluster, tmp_path: Path) -> None:
    cluster = on_test_driver(example, tmp_path)
    kvm0 = Path(cluster.site.hosts["kvm0"].disk_dir)
    (kvm0 / "unrelated.qcow2").write_bytes(b"someone else's")
    with connections(cluster, execute=Recorder(fail_on="db.img")) as conns:
        before = domain_names(conns.get("kvm0"))  # the test driver's own domain "test"
        with pytest.raises(ProvisionFailed) as err:
            provision(cluster, ["ldap", "mcp", "db"], conns, log=quiet)
        assert domain_names(conns.get("kvm0")) == before
    message = str(err.value)
    assert message.startswith("provisioning failed: localhost: `qemu-img create -q -f raw")
    # Newest first, in cluster.conf order mcp, ldap, db: db failed, so ldap's steps, then mcp's, were undone.
    assert "injected failure\nundone: ldap: started; ldap: defined on kvm0; ldap: created qcow2 disk" in message
    assert "; mcp: started; mcp: defined on kvm0; mcp: created qcow2 disk" in message
    assert files_under(kvm0) == {"unrelated.qcow2"}


def test_an_unreachable_host_stops_the_run_before_anything_is_created(example: Cluster, tmp_path: Path) -> None:
    cluster = on_test_driver(example, tmp_path, {"kvm1": NOWHERE})
    with connections(cluster) as conns:
        with pytest.raises(HostUnreachable, match="host 'kvm1': cannot connect"):
            provision(cluster, ["ldap", "compute1"], conns, log=quiet)
        assert "ldap" not in domain_names(conns.get("kvm0"))
    assert files_under(tmp_path) == {"base.qcow2"}


def test_sigterm_midway_rolls_back_like_a_failure(cluster: Cluster) -> None:
    kill = Recorder(on_call="/.ldap.qcow2.", action=lambda: os.kill(os.getpid(), signal.SIGTERM))  # its temporary
    with connections(cluster, execute=kill) as conns:  # mcp comes first in cluster.conf, then ldap
        with pytest.raises(ProvisionFailed, match="provisioning failed: interrupted\nundone: mcp: started; mcp:"):
            provision(cluster, ["ldap", "mcp"], conns, log=quiet)
        assert not {"ldap", "mcp"} & domain_names(conns.get("kvm0"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert files_under(Path(cluster.site.hosts["kvm0"].disk_dir)) == set()


def test_an_interrupt_as_the_disk_lands_still_undoes_the_disk(cluster: Cluster) -> None:
    # The disk is in place and its temporary just removed: the interrupt lands before create() has returned.
    recorder = Recorder()

    def kill_after_the_temporary_is_removed(argv: Sequence[str], stdin: bytes | None) -> Result:
        result = recorder(argv, stdin)
        if list(argv[:3]) == ["rm", "-f", "--"] and "/.ldap.qcow2." in argv[3]:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    disk = Path(cluster.site.hosts["kvm0"].disk_dir) / "ldap.qcow2"
    with connections(cluster, execute=kill_after_the_temporary_is_removed) as conns, \
            pytest.raises(ProvisionFailed) as err:
        provision(cluster, ["ldap"], conns, log=quiet)
    assert str(err.value) == f"provisioning failed: interrupted\nundone: ldap: created qcow2 disk {disk} (10 GB, thin)"
    assert files_under(disk.parent) == set()


def test_an_interrupt_as_a_domain_is_defined_still_undefines_it(cluster: Cluster, conns: Connections,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in, because nothing real can make a signal arrive in the instant between libvirt's defineXML
    # returning and the journal entry: the real define, then a SIGTERM to this process before anything else runs.
    real_define = domains.define

    def define_then_sigterm(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
        dom = real_define(conn, xml)
        os.kill(os.getpid(), signal.SIGTERM)
        return dom

    monkeypatch.setattr(domains, "define", define_then_sigterm)
    disk = Path(cluster.site.hosts["kvm0"].disk_dir) / "ldap.qcow2"
    with pytest.raises(ProvisionFailed) as err:
        provision(cluster, ["ldap"], conns, log=quiet)
    assert str(err.value) == ("provisioning failed: interrupted\nundone: ldap: defined on kvm0; ldap: created qcow2"
                              f" disk {disk} (10 GB, thin)")
    assert "ldap" not in domain_names(conns.get("kvm0")) and files_under(disk.parent) == set()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_lvm_disk_is_made_with_exactly_one_lvcreate_and_purged_with_lvremove(cluster: Cluster) -> None:
    recorder = Recorder()
    with connections(cluster, execute=recorder) as conns:
        provision(cluster, ["compute1"], conns, Options(start=False), log=quiet)
        lvm = [call for call in recorder.calls if call[0].startswith("lv")]
        assert lvm == [["lvcreate", "--yes", "-n", "vm-compute1", "-L", "100G", "vg0"]]
        source = ET.fromstring(domains.inactive_xml(conns.get("kvm1").lookupByName("compute1"))).find(
            "devices/disk/source")
        assert source is not None and source.get("dev") == "/dev/vg0/vm-compute1"
        recorder.calls.clear()
        # The recorded lvcreate made nothing, so pretend the device node is there for destroy --purge.
        recorder.on_call, recorder.action = None, None
        real = recorder.__call__

        def exists(argv: Sequence[str], stdin: bytes | None) -> Result:
            if list(argv) == ["test", "-e", "/dev/vg0/vm-compute1"]:
                return subprocess.CompletedProcess(list(argv), 0, b"", b"")
            return real(argv, stdin)

        conns.execute = exists
        lifecycle.destroy(cluster, "compute1", conns, purge=True, log=quiet)
        assert [call for call in recorder.calls if call[0].startswith("lv")] == [
            ["lvremove", "--yes", "vg0/vm-compute1"]]


def _blocked_by_vgs(cluster: Cluster, vgs: tuple[int, bytes, bytes]) -> tuple[str, list[list[str]]]:
    """Provision ldap (kvm0, qcow2) and compute1 (kvm1, LVM) with `vgs` answering (status, stdout, stderr): a mock,
    as no device-mapper is here. The run must stop before anything is made; its message, and the vgs calls."""
    calls: list[list[str]] = []

    def lvm(argv: Sequence[str], stdin: bytes | None) -> Result:
        if argv[0] == "vgs":
            calls.append(list(argv))
            return subprocess.CompletedProcess(list(argv), *vgs)
        return Recorder()(argv, stdin)

    with connections(cluster, execute=lvm) as conns:
        with pytest.raises(ProvisionBlocked) as err:
            provision(cluster, ["ldap", "compute1"], conns, log=quiet)
        assert "ldap" not in domain_names(conns.get("kvm0"))
    assert files_under(Path(cluster.site.hosts["kvm0"].disk_dir)) == set()
    return str(err.value), calls


def test_a_missing_volume_group_stops_the_run_before_anything_is_created(cluster: Cluster) -> None:
    message, _ = _blocked_by_vgs(cluster, (5, b"", b'  Volume group "vg0" not found\n'))
    assert message == ('compute1: volume group vg0 is not usable on kvm1 (Volume group "vg0" not found); create'
                       " it there or change disk=lvm:<vg> in cluster.conf\nnothing was changed")


def test_a_volume_group_without_room_for_the_new_volumes_stops_the_run_before_anything_is_created(
        cluster: Cluster) -> None:
    """lvcreate refused only once the VMs before it were made (and started), which the run then undid."""
    # What lvm2 2.03 prints for a VG with 60 MiB free.
    message, calls = _blocked_by_vgs(cluster, (0, b"  vg0 62914560\n", b""))
    assert calls == [["vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_name,vg_free", "vg0"]]
    assert message == ("compute1: volume group vg0 on kvm1 has 0.1 GB free, and its new volume needs 100 GB;"
                       " free space there (vgextend), or give less disk or another disk=lvm:<vg> in"
                       " cluster.conf\nnothing was changed")


# --- destroy, start, stop ----------------------------------------------------------------------

def test_destroy_keeps_the_disk_and_purge_removes_it_only_when_confirmed(cluster: Cluster, conns: Connections) -> None:
    provision(cluster, ["db"], conns, log=quiet)
    disk = Path(disks.disk_spec(cluster, cluster.vm("db")).path)
    lines: list[str] = []
    lifecycle.destroy(cluster, "db", conns, log=lines.append)
    assert lines == ["db: powered off", "db: undefined on kvm0", f"db: disk {disk} kept (remove it with --purge)"]
    assert disk.exists() and "db" not in domain_names(conns.get("kvm0"))
    asked: list[str] = []
    with pytest.raises(KvmconfError, match="db: not destroyed \\(not confirmed; nothing was changed\\)"):
        lifecycle.destroy(cluster, "db", conns, purge=True, confirm=lambda q: asked.append(q) or False, log=quiet)
    assert asked == [f"db on kvm0: remove {disk} for good. Go ahead?"] and disk.exists()
    lifecycle.destroy(cluster, "db", conns, purge=True, confirm=None, log=quiet)
    assert not disk.exists()


def test_destroy_names_the_disk_a_vm_has_when_cluster_conf_now_puts_its_disk_elsewhere(
        cluster: Cluster, conns: Connections) -> None:
    """What plan tells to do after a disk= change (`destroy` first: it keeps the old disk) said "disk db.qcow2 kept
    (remove it with --purge)": a path with nothing there, while the data stayed in db.img, which --purge never
    removes."""
    provision(cluster, ["db"], conns, log=quiet)  # disk=raw: db.img
    kvm0 = Path(cluster.site.hosts["kvm0"].disk_dir)
    db = cluster.vm("db")
    as_qcow2 = dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, disk=dataclasses.replace(vm.disk, kind=DiskKind.QCOW2)) if vm is db else vm
        for vm in cluster.vms))
    kept = (f"db: its disk {kvm0 / 'db.img'} kept: cluster.conf puts its disk at {kvm0 / 'db.qcow2'}, which --purge"
            f" removes, not {kvm0 / 'db.img'}; remove {kvm0 / 'db.img'} by hand when it is no longer wanted")
    lines: list[str] = []
    lifecycle.destroy(as_qcow2, "db", conns, log=lines.append)
    assert lines == ["db: powered off", "db: undefined on kvm0", kept]
    provision(cluster, ["db"], conns, Options(reuse_disk=True, start=False), log=quiet)
    lines.clear()
    lifecycle.destroy(as_qcow2, "db", conns, purge=True, dry_run=True, log=lines.append)
    assert lines == [f"db on kvm0: would undefine, keep {kvm0 / 'db.img'}, the disk it has, which is not where"
                     " cluster.conf puts its disk"]
    lines.clear()
    lifecycle.destroy(as_qcow2, "db", conns, purge=True, log=lines.append)
    assert lines == ["db: undefined on kvm0", kept]
    assert files_under(kvm0) == {"db.img"}


def test_destroy_asks_before_it_loses_data_and_lists_every_step(cluster: Cluster, conns: Connections) -> None:
    # No domain object and no ExceptionInfo kept in a local: either would keep the test driver's state,
    # shared in this process, alive into the next tests.
    provision(cluster, ["db"], conns, log=quiet)
    disk = Path(disks.disk_spec(cluster, cluster.vm("db")).path)
    asked: list[str] = []

    def no(question: str) -> bool:
        asked.append(question)
        return False

    for purge in (False, True):
        with pytest.raises(KvmconfError, match=r"^db: not destroyed \(not confirmed; nothing was changed\)$"):
            lifecycle.destroy(cluster, "db", conns, purge=purge, confirm=no, log=quiet)
    power_off = "power off (it is running: what the guest has not written to disk is lost)"
    assert asked == [f"db on kvm0: {power_off}, undefine. Go ahead?",
                     f"db on kvm0: {power_off}, undefine, remove {disk} for good. Go ahead?"]
    assert conns.get("kvm0").lookupByName("db").isActive() and disk.exists()
    conns.get("kvm0").lookupByName("db").managedSave(0)  # shut off, its memory saved: undefining deletes that
    asked.clear()
    with pytest.raises(KvmconfError, match="db: not destroyed"):
        lifecycle.destroy(cluster, "db", conns, confirm=no, log=quiet)
    assert asked == ["db on kvm0: undefine (deleting its saved memory state). Go ahead?"]
    conns.get("kvm0").lookupByName("db").managedSaveRemove(0)
    lines: list[str] = []
    lifecycle.destroy(cluster, "db", conns, confirm=no, log=lines.append)  # shut off, nothing lost: not asked
    assert len(asked) == 1 and lines == ["db: undefined on kvm0", f"db: disk {disk} kept (remove it with --purge)"]


def test_destroy_says_it_drops_the_backup_checkpoints_without_asking(cluster: Cluster, conns: Connections) -> None:
    provision(cluster, ["db"], conns, log=quiet)
    conns.get("kvm0").lookupByName("db").checkpointCreateXML(  # as a backup of the running VM leaves one
        "<domaincheckpoint><name>kvmconf-20261122T000000Z</name></domaincheckpoint>", 0)
    conns.get("kvm0").lookupByName("db").destroy()  # shut off: only the checkpoint would go with the definition
    lines: list[str] = []
    lifecycle.destroy(cluster, "db", conns, dry_run=True, log=lines.append)
    assert lines == ["db on kvm0: would undefine (deleting its backup checkpoints, so that the next backup is a full"
                     " one)"]
    lifecycle.destroy(cluster, "db", conns, confirm=lambda _q: False, log=lines.append)  # not data: not asked
    assert "db" not in domain_names(conns.get("kvm0"))


def test_start_and_stop_report_what_they_did(cluster: Cluster, conns: Connections) -> None:
    provision(cluster, ["mcp"], conns, Options(start=False), log=quiet)
    lines: list[str] = []
    lifecycle.start(cluster, "mcp", conns, dry_run=True, log=lines.append)
    lifecycle.start(cluster, "mcp", conns, log=lines.append)
    lifecycle.start(cluster, "mcp", conns, log=lines.append)
    lifecycle.stop(cluster, "mcp", conns, force=True, dry_run=True, log=lines.append)
    assert conns.get("kvm0").lookupByName("mcp").isActive()
    lifecycle.stop(cluster, "mcp", conns, force=True, log=lines.append)
    assert lines == ["mcp on kvm0: would start", "mcp: started on kvm0", "mcp: already running on kvm0",
                     "mcp on kvm0: would power off", "mcp: powered off"]
    with pytest.raises(KvmconfError, match="ldap is not defined on kvm0; create it with `invoke provision --vm ldap`"):
        lifecycle.start(cluster, "ldap", conns, log=quiet)


def test_an_unknown_vm_name_suggests_close_ones(cluster: Cluster) -> None:
    with pytest.raises(UnknownVm, match=r"'lldap' is not a VM of cluster.conf \(did you mean ldap\?\)"):
        select(cluster, ["lldap"], False)
    with pytest.raises(KvmconfError, match="name the VMs with --vm NAME"):
        select(cluster, [], False)
    with pytest.raises(WrongUsage) as err:
        select(cluster, ["web"], True)
    assert str(err.value) == "give --vm NAME or --all, not both (--all means every VM in cluster.conf)"
    assert [vm.name for vm in select(cluster, ["web", "provision"], False)] == ["provision", "web"]  # file order


def test_an_unknown_vm_name_shows_a_few_of_the_vms(cluster: Cluster) -> None:
    with pytest.raises(UnknownVm) as err:
        find_vm(cluster, "lldap")
    assert str(err.value) == ("'lldap' is not a VM of cluster.conf (did you mean ldap?); expected one of: provision,"
                              " mcp, ldap, db, web, ... (8 in all; `invoke status` lists them)")
    with pytest.raises(UnknownVm) as err:
        find_vm(dataclasses.replace(cluster, vms=cluster.vms[:3]), "www")
    assert str(err.value) == "'www' is not a VM of cluster.conf; expected one of: provision, mcp, ldap"
    with pytest.raises(UnknownVm) as err:
        find_vm(dataclasses.replace(cluster, vms=()), "www")
    assert str(err.value) == "'www' is not a VM of cluster.conf; it has no VMs"


def test_an_unknown_host_name_lists_the_hosts_of_site_toml(cluster: Cluster) -> None:
    assert find_host(cluster, "kvm1") is cluster.site.hosts["kvm1"]
    with pytest.raises(UnknownHost) as err:
        find_host(cluster, "kvm9")
    assert str(err.value) == f"'kvm9' is not a host of {cluster.site.path} (expected one of: kvm0, kvm1)"


def test_the_tasks_whose_vm_is_optional_take_no_name_as_every_vm(cluster: Cluster) -> None:
    assert select_or_all(cluster, []) == list(cluster.vms)
    assert [vm.name for vm in select_or_all(cluster, ["web", "provision"])] == ["provision", "web"]
    with pytest.raises(UnknownVm, match=r"'lldap' is not a VM of cluster.conf \(did you mean ldap\?\)"):
        select_or_all(cluster, ["lldap"])


def test_plan_lists_domains_not_in_cluster_conf(cluster: Cluster, conns: Connections) -> None:
    plan = make_plan(cluster, cluster.vms, conns, others=True)
    assert [h.others for h in plan.hosts] == [["test"], ["test"]]  # the test driver's own domain
    assert plan.count(Action.CREATE) == len(cluster.vms)


def test_every_unknown_vm_name_is_in_the_one_error(cluster: Cluster) -> None:
    with pytest.raises(UnknownVm) as err:
        select(cluster, ["web", "nosuch", "lldap", "nosuch", "nope"], False)
    assert str(err.value) == ("'nosuch', 'lldap' (did you mean ldap?), 'nope' are not VMs of cluster.conf; expected one"
                              " of: provision, mcp, ldap, db, web, ... (8 in all; `invoke status` lists them)")
    assert [vm.name for vm in find_vms(cluster, ["web", "db"])] == ["web", "db"]  # in the order asked


# --- what provisioning never creates a second time -----------------------------------------------------

class CountingConnection:
    """A real connection that counts its domain listings (libvirt's own class cannot be given an attribute)."""

    def __init__(self, conn: libvirt.virConnect, listings: list[str], uri: str) -> None:
        self._conn, self._listings, self._uri = conn, listings, uri

    def listAllDomains(self, flags: int = 0) -> list[libvirt.virDomain]:
        self._listings.append(self._uri)
        return self._conn.listAllDomains(flags)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


@pytest.fixture
def two_hosts(example: Cluster, tmp_path: Path) -> Cluster:
    """The example cluster with a test driver of its own per host (test:///<file>: each is a separate libvirt)."""
    uris = {}
    for host in example.site.hosts:
        (tmp_path / f"{host}.xml").write_text("<node></node>")
        uris[host] = f"test://{tmp_path}/{host}.xml"
    return on_test_driver(example, tmp_path, uris)


def test_a_vm_defined_on_another_host_or_holding_a_mac_under_another_name_is_not_created(
        two_hosts: Cluster, tmp_path: Path) -> None:
    listings: list[str] = []

    def opener(uri: str) -> libvirt.virConnect:
        return cast(libvirt.virConnect, CountingConnection(libvirt.open(uri), listings, uri))

    with connections(two_hosts, opener, execute=Recorder()) as conns:
        kvm1 = conns.get("kvm1")
        xml = make_plan(two_hosts, [two_hosts.vm("login"), two_hosts.vm("web")], conns).vms
        kvm1.defineXML(xml[0].xml)  # login, as host=auto placed it before another line changed
        kvm1.defineXML(re.sub("<uuid>.*</uuid>", "", xml[1].xml.replace("<name>web</name>", "<name>www</name>")))
        listings.clear()
        plan = make_plan(two_hosts, [two_hosts.vm(name) for name in ("ldap", "web", "login", "compute1")], conns)
        assert sorted(listings) == sorted({h.uri for h in two_hosts.site.hosts.values()})  # once per host
        with pytest.raises(ProvisionBlocked) as err:
            provision(two_hosts, ["ldap", "web", "login"], conns, log=quiet)
        assert domain_names(conns.get("kvm0")) == set() and domain_names(kvm1) == {"login", "www"}
    assert plan.hosts[0].problems == str(err.value).splitlines()[:-1]
    assert str(err.value) == (
        "web: its MAC 52:54:00:50:00:21 belongs to domain 'www' defined on kvm1; it is not created beside it (two"
        " guests with one MAC and IP): if www is an old name of web, undefine it on kvm1 first, else give web another"
        " MAC\nlogin: defined on kvm1 already, but cluster.conf places it on kvm0; it is not created a second time: to"
        " move it, set host=kvm1 for it in cluster.conf again and run `invoke migrate --vm login --to kvm0 --edit`; to"
        " keep it there, set host=kvm1; or undefine it on kvm1 if that copy is unwanted\nnothing was changed")
    assert files_under(tmp_path / "kvm0") == set()


def test_a_host_that_cannot_be_listed_is_named_and_the_run_goes_on(example: Cluster, tmp_path: Path) -> None:
    # A dead host runs no copy of anything: refusing would stop the VMs of the others being made again.
    cluster = on_test_driver(example, tmp_path, {"kvm1": NOWHERE})
    lines: list[str] = []
    with connections(cluster, execute=Recorder()) as conns:
        provision(cluster, ["ldap"], conns, Options(start=False), log=lines.append)
        assert "ldap" in domain_names(conns.get("kvm0"))
    assert lines[0] == (f"warning, not checked: host 'kvm1': cannot connect to libvirt at {NOWHERE} (Failed to connect"
                        " socket to '/nonexistent/kvmconf-test/libvirt-sock': No such file or directory); check"
                        f" [hosts.kvm1] uri in {cluster.site.path} and that libvirtd runs there; so whether a VM to"
                        " create is defined there already (under its name or MAC) is not known")


# --- seed ISOs of VMs that exist ---------------------------------------------------------------------

def test_a_changed_or_missing_seed_iso_is_a_change_applied_only_with_apply(cluster: Cluster,
                                                                            conns: Connections) -> None:
    provision(cluster, ["provision"], conns, Options(start=False), log=quiet)
    seed = Path(cluster.site.hosts["kvm0"].disk_dir) / "provision-seed.iso"
    old = seed.read_bytes()
    accounts = dataclasses.replace(cluster.site.accounts, ssh_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFvq3ekr8hCx"
                                                                    "Wn5tLCX6TfvWO5w8VFtOr3kRxK9Vp3m admin@new",))
    changed = dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, accounts=accounts))
    new = cloud_init.render(changed)[PurePosixPath("cloud-init/provision.iso")]
    assert new != old
    [p] = make_plan(changed, [changed.vm("provision")], conns).vms
    assert (p.action, p.seed_now, p.diff) == (Action.CHANGE, "different", [])
    lines: list[str] = []
    provision(changed, ["provision"], conns, log=lines.append)
    assert lines == ["provision: seed ISO differs from the generated one (not applied; run again with --apply):",
                     f"    seed ISO {seed} differs from the generated one: replace it (applies at the next boot)",
                     "0 created, 1 to change (shown, not applied), 0 unchanged"]
    assert seed.read_bytes() == old
    lines.clear()
    provision(changed, ["provision"], conns, Options(apply=True), log=lines.append)
    assert lines == [f"provision: wrote seed ISO {seed} (applies at the next boot)",
                     "0 created, 1 changed, 0 unchanged"]
    assert seed.read_bytes() == new
    assert make_plan(changed, [changed.vm("provision")], conns).vms[0].action is Action.KEEP
    seed.unlink()
    [p] = make_plan(changed, [changed.vm("provision")], conns).vms
    assert (p.action, p.seed_now) == (Action.CHANGE, "missing")
    provision(changed, ["provision"], conns, Options(apply=True), log=quiet)
    assert seed.read_bytes() == new


# --- the lab as the tasks see it ---------------------------------------------------------------

def test_the_lab_moves_every_host_into_itself_and_forces_software_emulation(example: Cluster, tmp_path: Path) -> None:
    the_lab = lab.Lab(tmp_path, "kvmconf-x")
    moved = lab.remap(example, the_lab)
    assert {h.uri for h in moved.site.hosts.values()} == {f"qemu+unix:///system?socket={tmp_path}/sock/libvirt-sock"}
    assert moved.site.hosts["kvm1"].disk_dir == str(tmp_path / "images" / "kvm1")
    assert moved.site.domain_type is DomainType.QEMU
    assert moved.site.oses["bookworm"].cloud_image == str(tmp_path / "base" / "bookworm.qcow2")
    assert (moved.site.provision.interface, moved.site.provision.config_dir) == ("br0", str(tmp_path / "kvmconf"))
    assert lab.bridge_addresses(example) == {"br0": "192.168.50.2/24", "br60": "192.168.60.1/24"}
    assert lab.remap(example, dataclasses.replace(the_lab, kvm=True)).site.domain_type is DomainType.KVM


def test_a_vm_defined_on_a_daemon_several_hosts_share_is_told_one_host_to_set(example: Cluster) -> None:
    """In a lab several hosts share a daemon; host= takes one name, never 'kvm1/kvm2'."""
    web = dataclasses.replace(example.vm("web"), host="kvm0")
    shared = Inventory(domains=[Domain("web", frozenset({"kvm2", "kvm1"}), frozenset())])
    assert shared.clashes(web) == [
        "web: defined on kvm1/kvm2 already, but cluster.conf places it on kvm0; it is not created a second time: to"
        " move it, set host=kvm1 for it in cluster.conf again and run `invoke migrate --vm web --to kvm0 --edit`; to"
        " keep it there, set host=kvm1; or undefine it on kvm1/kvm2 if that copy is unwanted"]


def test_start_stop_and_destroy_of_a_vm_defined_on_another_host_say_where_and_touch_nothing(
        two_hosts: Cluster, tmp_path: Path) -> None:
    # After `invoke migrate` without --edit: destroy said "not defined on kvm0" (exit 0), --purge removed kvm0's
    # copy of the disk, and start advised a provision that is refused; all while the VM ran on kvm1.
    with connections(two_hosts, execute=Recorder()) as conns:
        [web] = make_plan(two_hosts, [two_hosts.vm("web")], conns).vms
        conns.get("kvm1").defineXML(web.xml)
        leftover = tmp_path / "kvm0/web.qcow2"
        leftover.write_bytes(b"the copy the move left")
        expected = ("web is not defined on kvm0, where cluster.conf places it, but on kvm1; nothing was changed: set"
                    " host=kvm1 for it in cluster.conf to act on it there")
        for act in (lambda: lifecycle.start(two_hosts, "web", conns, log=quiet),
                    lambda: lifecycle.stop(two_hosts, "web", conns, force=True, log=quiet),
                    lambda: lifecycle.destroy(two_hosts, "web", conns, purge=True, log=quiet)):
            with pytest.raises(KvmconfError) as err:
                act()
            assert str(err.value) == expected
        assert leftover.read_bytes() == b"the copy the move left" and domain_names(conns.get("kvm1")) == {"web"}
        # Not defined anywhere: what it said before.
        conns.get("kvm1").lookupByName("web").undefine()
        with pytest.raises(KvmconfError) as err:
            lifecycle.start(two_hosts, "web", conns, log=quiet)
        assert str(err.value) == "web is not defined on kvm0; create it with `invoke provision --vm web`"
