"""fab kvm-setup against a real sshd on 127.0.0.x chrooted into an overlay root, and its bridge files checked."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import paramiko
import pytest
import yaml

from generators.errors import ConfigError
from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf.hostsetup import (
    MODULES,
    SYSCTL,
    VF_NETWORK_DIR,
    bridges,
    host_files,
    nmcli_commands,
    setup,
    vf_network_files,
)
from kvmconf.keyscan import keyscan
from kvmconf.remote import RemoteError
from tests import sshfarm
from tests.tools import require_module, require_tool, run


def _with_host(cluster: Cluster, **changes: object) -> Cluster:
    hosts = dict(cluster.site.hosts)
    hosts["kvm0"] = dataclasses.replace(hosts["kvm0"], address=None, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hosts=hosts))


def test_the_files_kvm_setup_pushes_are_the_same_however_the_inputs_paths_were_given(example: Cluster) -> None:
    """Their banners named cluster.conf and site.toml as given: run from hosts/ (../cluster.conf) or with
    KVMCONF_CLUSTER as a full path, every file was pushed again and sysctl, ifup and the VF pools redone."""
    def rendered(cluster_conf: str, site_toml: str) -> list[bytes]:
        site = dataclasses.replace(example.site, path=site_toml)
        cluster = _with_host(dataclasses.replace(example, source=cluster_conf, site=site), sriov={"eno2": 4})
        host = cluster.site.hosts["kvm0"]
        system, bridge = host_files(cluster, host)
        return [spec.content for spec in [*system, *([bridge] if bridge else []), *vf_network_files(cluster, host)]]

    top = rendered("cluster.conf", "site.toml")
    assert len(top) == 4 and all(b"from cluster.conf and site.toml with templates/" in text for text in top)
    assert rendered("../cluster.conf", "../site.toml") == top
    assert rendered("/root/kvmconf/cluster.conf", "/root/kvmconf/site.toml") == top


def test_bridges_follow_site_toml(example: Cluster) -> None:
    cluster = _with_host(example, uplink="eno1")
    assert [(b.name, b.vlan, b.port) for b in bridges(cluster, cluster.site.hosts["kvm0"])] == [
        ("br60", 60, "eno1.60"), ("br0", None, "eno1")]


def test_network_manager_commands_are_listed_and_only_for_missing_connections(example: Cluster) -> None:
    host = _with_host(example, uplink="eno1", network_stack="networkmanager").site.hosts["kvm0"]
    assert nmcli_commands(example, host, set(), set()) == [
        ["nmcli", "connection", "add", "type", "bridge", "con-name", "kvmconf-br60", "ifname", "br60",
         "bridge.stp", "no", "bridge.forward-delay", "0", "ipv4.method", "disabled", "ipv6.method", "ignore"],
        ["nmcli", "connection", "add", "type", "vlan", "dev", "eno1", "id", "60", "con-name", "kvmconf-br60-port",
         "ifname", "eno1.60", "master", "br60", "slave-type", "bridge"],
        ["nmcli", "connection", "add", "type", "bridge", "con-name", "kvmconf-br0", "ifname", "br0",
         "bridge.stp", "no", "bridge.forward-delay", "0", "ipv4.method", "disabled", "ipv6.method", "ignore"],
        ["nmcli", "connection", "add", "type", "ethernet", "con-name", "kvmconf-br0-port", "ifname", "eno1",
         "master", "br0", "slave-type", "bridge"],
        ["nmcli", "connection", "up", "kvmconf-br60"], ["nmcli", "connection", "up", "kvmconf-br0"]]
    every = {"kvmconf-br60", "kvmconf-br60-port", "kvmconf-br0", "kvmconf-br0-port"}
    assert nmcli_commands(example, host, every, every) == []
    # All there, but a bridge down (an earlier run's `connection up` failed): up again, that one alone.
    up_br0 = [["nmcli", "connection", "up", "kvmconf-br0"]]
    assert nmcli_commands(example, host, every, every - {"kvmconf-br0"}) == up_br0


def test_site_toml_network_keys_are_validated(tmp_path: Path) -> None:
    site = Path("site.toml").read_text().replace("[hosts.kvm0]\n", '[hosts.kvm0]\nnetwork_stack = "systemd"\n'
                                                 'uplink = "eth0; reboot"\n')
    (tmp_path / "site.toml").write_text(site)
    with pytest.raises(ConfigError) as err:
        load_cluster(Path("cluster.conf"), tmp_path / "site.toml")
    messages = [p.message for p in err.value.problems]
    assert "'systemd' is not a network stack (expected ifupdown, netplan or networkmanager)" in messages[0]
    assert "'eth0; reboot' is not an interface name" in messages[1]


# The network namespace whose interfaces `ip` shows on the farm's kvm0 (a wrapper in its root): the host's own
# interfaces, which the tests add, not this machine's (an eno1 here with an address would be refused as uplink).
HOST_NETNS = f"kvmconf-hostsetup-{os.getpid()}"


@pytest.fixture(scope="module")
def farm() -> Iterator[sshfarm.Farm]:
    require_tool("sshd")
    started = sshfarm.start(["kvm0"], tag="-hostsetup")
    subprocess.run(["ip", "netns", "add", HOST_NETNS], check=True)
    try:
        wrapper = started.root("kvm0") / "usr/local/sbin/ip"
        # Through /proc (bind-mounted in the root): the chroot's /run holds no netns.
        wrapper.write_text(f"#!/bin/sh\nexec nsenter --net=/proc/{os.getpid()}/root/run/netns/{HOST_NETNS}"
                           f' {require_tool("ip")} "$@"\n')
        wrapper.chmod(0o755)
        keyscan(["kvm0"], started.ssh_config)
        yield started
    finally:
        sshfarm.teardown(started.base)
        subprocess.run(["ip", "netns", "delete", HOST_NETNS], check=True)


def _files(root: Path) -> dict[str, bytes]:
    # The stubs' own logs aside (a dry run may read state with `nmcli ... show`, which the stub logs).
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "kvmconf-test" not in p.parts}


@pytest.mark.services
@pytest.mark.slow
def test_ifupdown_host_setup_is_idempotent_with_network_in_dry_run(
        example: Cluster, farm: sshfarm.Farm, tmp_path: Path) -> None:
    ifquery = require_tool("ifquery")
    # A disk_dir of its own: /var/lib/libvirt/images exists on this machine (and so in the VM's overlay).
    cluster = _with_host(example, uplink="eno1", network_stack="ifupdown", disk_dir="/var/lib/kvmconf-test-images")
    report = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    assert report.error is None, report.lines
    upper = farm.upper("kvm0")
    assert b"net.ipv4.ip_forward = 1\n" in (upper / SYSCTL.lstrip("/")).read_bytes()
    assert (upper / MODULES.lstrip("/")).read_text().endswith("\nbr_netfilter\n")
    assert farm.log("kvm0", "modprobe") == ["br_netfilter"] and farm.log("kvm0", "sysctl") == [f"-q -p {SYSCTL}"]
    assert (upper / "var/lib/kvmconf-test-images").is_dir()
    assert (farm.root("kvm0") / "var/backups/kvmconf").is_dir()
    # The network step only printed its file and command.
    bridge_file = "/etc/network/interfaces.d/kvmconf-bridges"
    assert not (upper / bridge_file.lstrip("/")).exists() and farm.log("kvm0", "ifup") == []
    assert "network (ifupdown): would run: ifup -- eno1.60 br60 br0" in report.lines
    assert any(d.startswith(f"--- {bridge_file}") for d in report.diffs)
    # ifupdown itself reads the generated file: the VLAN subinterface and the bridges on it.
    interfaces = tmp_path / "interfaces"
    interfaces.write_bytes(report.files[bridge_file])
    listed = run([ifquery, "-i", str(interfaces), "-l"])
    assert (listed.returncode, listed.stdout.split()) == (0, ["lo", "eno1.60", "br60", "br0"]), listed.stderr
    br60 = run([ifquery, "-i", str(interfaces), "br60"])
    assert br60.returncode == 0 and "bridge_ports: eno1.60\n" in br60.stdout, br60.stderr
    vlan = run([ifquery, "-i", str(interfaces), "eno1.60"])
    assert vlan.returncode == 0 and "vlan-raw-device: eno1\n" in vlan.stdout, vlan.stderr
    # Idempotent: a second run changes and applies nothing.
    farm.clear_logs()
    again = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    assert again.lines[1:] == ["settings: unchanged", "network (ifupdown): would change: " + bridge_file,
                               "network (ifupdown): would run: ifup -- eno1.60 br60 br0", "directories: present"]
    assert farm.log("kvm0", "modprobe") == farm.log("kvm0", "sysctl") == []
    # (The apt-get stub installs nothing, so the same packages are still missing and asked for again.)
    assert again.lines[0] == report.lines[0]


@pytest.mark.services
@pytest.mark.slow
def test_netplan_and_networkmanager_dry_runs_change_nothing(example: Cluster, farm: sshfarm.Farm) -> None:
    before = _files(farm.upper("kvm0"))
    netplan = setup(_with_host(example, uplink="eno1", network_stack="netplan"), "kvm0", farm.ssh_config,
                    dry_run=True)
    assert netplan.error is None and netplan.lines[0].startswith("packages: ")
    doc = yaml.safe_load(netplan.files["/etc/netplan/60-kvmconf-bridges.yaml"])
    assert doc["network"]["vlans"] == {"eno1.60": {"id": 60, "link": "eno1"}}
    assert {name: b["interfaces"] for name, b in doc["network"]["bridges"].items()} == {
        "br0": ["eno1"], "br60": ["eno1.60"]}
    assert "network (netplan): would run: netplan apply" in netplan.lines
    nm = setup(_with_host(example, uplink="eno1", network_stack="networkmanager"), "kvm0", farm.ssh_config,
               dry_run=True)
    assert nm.error is None and len(nm.commands) == 6
    assert "network (networkmanager): would run: nmcli connection add type vlan dev eno1 id 60 con-name" \
           " kvmconf-br60-port ifname eno1.60 master br60 slave-type bridge" in nm.lines
    assert _files(farm.upper("kvm0")) == before


@pytest.mark.services
@pytest.mark.slow
def test_nested_virtualisation_check_names_the_fix(example: Cluster, farm: sshfarm.Farm) -> None:
    report = setup(_with_host(example, nested=True), "kvm0", farm.ssh_config, dry_run=True)
    # The chroot has an empty /sys: no KVM module says nested=Y there.
    assert report.error == ("nested: nested virtualisation is off, and [hosts.kvm0] of site.toml says nested = true:"
                            " set `options kvm_intel nested=1` (or kvm_amd) in a file of /etc/modprobe.d/ and reload"
                            " the module, or set nested = false")


@pytest.mark.services
@pytest.mark.slow
def test_without_address_kvm_setup_connects_to_the_hosts_name_not_its_uris_host(example: Cluster,
                                                                                 farm: sshfarm.Farm) -> None:
    # The admin's ssh config knows the host by its site.toml name (the farm's "Host kvm0"); the URI's host is a
    # name nothing here resolves, so connecting there would fail.
    cluster = _with_host(example, uri="qemu+ssh://root@kvm0.phys.example.invalid/system")
    report = setup(cluster, "kvm0", farm.ssh_config, dry_run=True)
    assert report.error is None
    assert report.lines and report.lines[0].startswith("packages: ")


@pytest.mark.services
@pytest.mark.slow
def test_an_unknown_or_changed_host_key_says_how_to_accept_it_for_a_physical_host(
        example: Cluster, farm: sshfarm.Farm, tmp_path: Path) -> None:
    # They said `invoke keyscan --vm kvm0`, which records VMs' keys only and refuses kvm0 as no VM of cluster.conf.
    known = tmp_path / "known_hosts"
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(farm.ssh_config.read_text().replace(str(farm.known_hosts), str(known)))
    cluster = _with_host(example)
    with pytest.raises(RemoteError) as unknown:
        setup(cluster, "kvm0", ssh_config, dry_run=True)
    assert str(unknown.value) == (f"kvm0: host key unknown (not in {known}): connect once with"
                                  f" `ssh -F {ssh_config} kvm0`, check the key's fingerprint and accept it")
    address, port = farm.addresses["kvm0"]
    other = paramiko.Ed25519Key.from_private_key_file(str(farm.base / "client_key"))  # any key but the host's
    known.write_text(f"[{address}]:{port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(RemoteError) as changed:
        setup(cluster, "kvm0", ssh_config, dry_run=True)
    assert str(changed.value) == (
        f"kvm0: its SSH host key CHANGED (known_hosts {known}); refusing to connect. if the host was reinstalled,"
        f" remove its old key with `ssh-keygen -f {known} -R '[{address}]:{port}'`, then connect once with"
        f" `ssh -F {ssh_config} kvm0` and check the new key's fingerprint")


@pytest.mark.services
@pytest.mark.slow
def test_fab_kvm_setup_dry_run_on_the_example_site(example: Cluster, farm: sshfarm.Farm, tmp_path: Path) -> None:
    # The example site.toml names no uplink: bridges without ports, and no VLAN subinterface to create.
    # It gives kvm0 an address, which is where fab kvm-setup connects: the farm's kvm0 answers there too.
    ssh_config = tmp_path / "ssh_config"
    address = example.site.hosts["kvm0"].address
    ssh_config.write_text(farm.ssh_config.read_text().replace("Host kvm0\n", f"Host kvm0 {address}\n"))
    proc = run([".venv/bin/fab", "kvm-setup", "--host", "kvm0", "--ssh-config", str(ssh_config), "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    # $KVMCONF_SSH_CONFIG does what --ssh-config does (as for the VM tasks).
    from_env = run([".venv/bin/fab", "kvm-setup", "--host", "kvm0", "--dry-run"],
                   env={**os.environ, "KVMCONF_SSH_CONFIG": str(ssh_config)})
    assert (from_env.returncode, from_env.stdout) == (0, proc.stdout), from_env.stderr
    assert "(dry run: nothing changed)\nkvm0: packages: " in proc.stdout
    assert "\nkvm0: network (ifupdown): would run: ifup -- br60 br0\n" in proc.stdout
    interfaces = tmp_path / "interfaces"
    body = proc.stdout.split("+++ /etc/network/interfaces.d/kvmconf-bridges (from templates/kvm-setup-interfaces.j2)\n")
    interfaces.write_text("".join(line[1:] + "\n" for line in body[1].splitlines()[1:] if line.startswith("+")))
    listed = run([require_tool("ifquery"), "-i", str(interfaces), "br60"])
    assert (listed.returncode, listed.stdout) == (0, "bridge_ports: none\nbridge_stp: off\nbridge_fd: 0\n"
                                                     "bridge_maxwait: 0\n"), listed.stderr
    bad = run([".venv/bin/fab", "kvm-setup", "--host", "kvm9", "--dry-run"])
    assert (bad.returncode, bad.stderr) == (
        2, "kvmconf: 'kvm9' is not a host of site.toml (expected one of: kvm0, kvm1)\n")


@pytest.mark.consumer
def test_vf_pool_networks_are_valid_libvirt_networks_named_as_the_domains_expect(example: Cluster,
                                                                                 tmp_path: Path) -> None:
    from generators.domain_xml import vf_pool_network

    libvirt = require_module("libvirt")
    cluster = _with_host(example, sriov={"eno2": 4, "ens1f0--x": 2})
    files = vf_network_files(cluster, cluster.site.hosts["kvm0"])
    assert [f.dest for f in files] == [f"{VF_NETWORK_DIR}/vf-eno2.xml", f"{VF_NETWORK_DIR}/vf-ens1f0--x.xml"]
    conn = libvirt.open("test:///default")
    try:
        for spec, pf in zip(files, ["eno2", "ens1f0--x"], strict=True):
            path = tmp_path / PurePosixPath(spec.dest).name
            path.write_bytes(spec.content)
            checked = run([require_tool("virt-xml-validate"), str(path), "network"])
            assert checked.returncode == 0, checked.stdout + checked.stderr  # also: no `--` in the banner comment
            network = conn.networkDefineXML(spec.content.decode())
            assert network.name() == vf_pool_network(pf) == f"vf-{pf}"
            assert f"<pf dev='{pf}'/>" in network.XMLDesc(0) and "mode='hostdev'" in network.XMLDesc(0)
            network.undefine()
    finally:
        conn.close()
    assert vf_network_files(example, example.site.hosts["kvm0"]) == []  # no sriov: no pools


@pytest.mark.services
@pytest.mark.slow
def test_kvm_setup_defines_and_starts_the_vf_pools(example: Cluster, farm: sshfarm.Farm) -> None:
    cluster = _with_host(example, sriov={"eno2": 4}, disk_dir="/var/lib/kvmconf-test-images")
    farm.clear_logs()
    dry = setup(cluster, "kvm0", farm.ssh_config, dry_run=True)
    assert dry.error is None, dry.lines
    virsh = "virsh -c qemu:///system"
    assert f"SR-IOV pools: would run: {virsh} net-start vf-eno2" in dry.lines
    assert farm.log("kvm0", "virsh") == ["-c qemu:///system net-list --all --name"]  # read-only in a dry run
    report = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    assert report.error is None, report.lines
    dest = f"{VF_NETWORK_DIR}/vf-eno2.xml"
    assert (farm.upper("kvm0") / dest.lstrip("/")).read_bytes() == vf_network_files(cluster, cluster.site.hosts[
        "kvm0"])[0].content
    assert farm.log("kvm0", "virsh")[1:] == ["-c qemu:///system net-list --all --name",
                                             f"-c qemu:///system net-define {dest}",
                                             "-c qemu:///system net-autostart vf-eno2",
                                             "-c qemu:///system net-start vf-eno2"]
    assert f"SR-IOV pools: changed: {dest}" in report.lines


@pytest.mark.services
@pytest.mark.slow
def test_a_vf_pool_whose_start_failed_is_started_by_the_next_run(example: Cluster, farm: sshfarm.Farm) -> None:
    # net-start fails while the PF has no VFs, after net-define: the next run found the pool defined and never
    # started it ("SR-IOV pools: defined", exit 0), and every VM with nic=vf:eno3 then failed to start.
    cluster = _with_host(example, sriov={"eno3": 4}, disk_dir="/var/lib/kvmconf-test-images")
    virsh = "virsh -c qemu:///system"
    stub = farm.root("kvm0") / "usr/local/sbin/virsh"
    working = stub.read_text()
    failing_start = 'if [ "$3" = net-start ]; then echo "error: No Vf\'s present on SRIOV PF eno3" >&2; exit 1; fi\n'
    # What libvirt says once the pool is defined: listed by --all, and by --inactive until it has started.
    defined_inactive = 'if [ "$3" = net-list ] && [ "$4" != --active ]; then echo vf-eno3; fi\n'
    try:
        stub.write_text(working + failing_start)
        failed = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
        assert failed.error == (f"SR-IOV pools: {virsh} net-start vf-eno3: exit 1: error: No Vf's present on SRIOV"
                                " PF eno3")
        stub.write_text(working + defined_inactive)
        farm.clear_logs()
        again = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    finally:
        stub.write_text(working)
    assert again.error is None, again.lines
    dest = f"{VF_NETWORK_DIR}/vf-eno3.xml"
    assert farm.log("kvm0", "virsh") == ["-c qemu:///system net-list --all --name",
                                         "-c qemu:///system net-list --inactive --name",
                                         f"-c qemu:///system net-define {dest}",
                                         "-c qemu:///system net-autostart vf-eno3",
                                         "-c qemu:///system net-start vf-eno3"]
    assert f"SR-IOV pools: ran: {virsh} net-start vf-eno3" in again.lines


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("stack", ["ifupdown", "netplan", "networkmanager"])
def test_an_uplink_with_the_hosts_address_is_not_made_a_bridge_port(example: Cluster, farm: sshfarm.Farm,
                                                                      stack: str) -> None:
    # The host's address was on eno1: ifup br0 (netplan apply, nmcli) made eno1 br0's port, which no longer answers
    # at its own address, and the host was cut off, the SSH session doing it too; the bridge file left in place did
    # the same at every boot. The template's comment said to move the address by hand; nothing checked it.
    ip = ["ip", "-n", HOST_NETNS]
    subprocess.run([*ip, "link", "add", "eno1", "type", "veth", "peer", "name", "eno1-peer"], check=True)
    try:
        subprocess.run([*ip, "address", "add", "192.0.2.7/24", "dev", "eno1"], check=True)
        subprocess.run([*ip, "address", "add", "2001:db8::7/64", "dev", "eno1", "nodad"], check=True)
        # Link-local: every interface that is up has one, a port too.
        subprocess.run([*ip, "address", "add", "fe80::7/64", "dev", "eno1", "nodad"], check=True)
        cluster = _with_host(example, uplink="eno1", network_stack=stack, disk_dir="/var/lib/kvmconf-test-images")
        farm.clear_logs()
        report = setup(cluster, "kvm0", farm.ssh_config)
        assert report.error == (
            f"network ({stack}): eno1 has 192.0.2.7, 2001:db8::7: as a port of bridge br0 (uplink = 'eno1' of"
            " [hosts.kvm0] in site.toml) it would no longer answer there, cutting the host off. Move the address to"
            " br0 in the host's own network configuration first, or make uplink a NIC without one; the network was"
            " left as it is")
        assert [tool for tool in ("ifup", "netplan", "nmcli") if farm.log("kvm0", tool)] == []
        upper = farm.upper("kvm0")
        assert not (upper / "etc/network/interfaces.d/kvmconf-bridges").exists()
        assert not (upper / "etc/netplan/60-kvmconf-bridges.yaml").exists()
        # The VLAN's port is eno1.60, not eno1: an address on eno1 alone would not stop br60; one on eno1.60 does.
        vlan_only = _with_host(example, uplink="eno1", network_stack=stack)
        networks = {name: net for name, net in vlan_only.site.networks.items() if net.vlan}
        vlan_only = dataclasses.replace(vlan_only, site=dataclasses.replace(vlan_only.site, networks=networks))
        assert setup(vlan_only, "kvm0", farm.ssh_config, dry_run=True).error is None
        # (A veth named so: this kernel may lack the 8021q module, and `ip` only reads its name and addresses.)
        subprocess.run([*ip, "link", "add", "eno1.60", "type", "veth", "peer", "name", "eno1.60-peer"], check=True)
        subprocess.run([*ip, "address", "add", "192.0.2.60/24", "dev", "eno1.60"], check=True)
        assert setup(vlan_only, "kvm0", farm.ssh_config, dry_run=True).error == (
            f"network ({stack}): eno1.60 has 192.0.2.60: as a port of bridge br60 (uplink = 'eno1' of [hosts.kvm0] in"
            " site.toml) it would no longer answer there, cutting the host off. Move the address to br60 in the"
            " host's own network configuration first, or make uplink a NIC without one; the network was left as it"
            " is")
        # The address moved off the ports (to the bridge, by the admin): the bridges are set up.
        for port in ("eno1", "eno1.60"):
            subprocess.run([*ip, "address", "flush", "dev", port, "scope", "global"], check=True)
        assert setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True).error is None
    finally:
        for link in ("eno1", "eno1.60"):  # and their veth peers with them
            subprocess.run([*ip, "link", "delete", link], check=False, capture_output=True)


@pytest.mark.services
@pytest.mark.slow
def test_a_network_manager_bridge_whose_up_failed_is_brought_up_by_the_next_run(example: Cluster,
                                                                                farm: sshfarm.Farm) -> None:
    # `nmcli connection up` failed after every connection was added: the next run found them all, added nothing,
    # said "connections present" and exited 0 with the bridges down, the VMs on them cut off.
    cluster = _with_host(example, network_stack="networkmanager", disk_dir="/var/lib/kvmconf-test-images")
    stub = farm.root("kvm0") / "usr/local/sbin/nmcli"
    working = stub.read_text()
    failing_up = ('if [ "$2" = up ]; then echo "Error: Connection activation failed: No suitable device found for'
                  ' this connection" >&2; exit 4; fi\n')
    # What NetworkManager says then: both connections there, br60 up and br0 not.
    one_down = ('if [ "$4" = show ]; then echo kvmconf-br60; [ "$5" = --active ] || echo kvmconf-br0; fi\n')
    try:
        stub.write_text(working + failing_up)
        failed = setup(cluster, "kvm0", farm.ssh_config)
        assert failed.error == ("network (networkmanager): nmcli connection up kvmconf-br60: exit 4: Error:"
                                " Connection activation failed: No suitable device found for this connection")
        stub.write_text(working + one_down)
        farm.clear_logs()
        again = setup(cluster, "kvm0", farm.ssh_config)
    finally:
        stub.write_text(working)
    assert again.error is None, again.lines
    assert farm.log("kvm0", "nmcli") == ["-g NAME connection show", "-g NAME connection show --active",
                                         "connection up kvmconf-br0"]
    assert "network (networkmanager): ran: nmcli connection up kvmconf-br0" in again.lines


BRIDGE_FILE = "/etc/network/interfaces.d/kvmconf-bridges"


@pytest.mark.services
@pytest.mark.slow
def test_ifupdown_without_linux_bridges_runs_no_ifup(example: Cluster, farm: sshfarm.Farm) -> None:
    # Every network on Open vSwitch: the file changed, and `ifup --` with no interface failed ("ifup: no
    # interface(s) specified", exit 1), that run and, the file's mark kept, every later one.
    networks = {name: dataclasses.replace(net, ovs=True) for name, net in example.site.networks.items()}
    only_ovs = dataclasses.replace(example, site=dataclasses.replace(example.site, networks=networks))
    cluster = _with_host(only_ovs, network_stack="ifupdown", disk_dir="/var/lib/kvmconf-test-images")
    farm.clear_logs()
    report = setup(cluster, "kvm0", farm.ssh_config)
    assert report.error is None, report.lines
    assert f"network (ifupdown): changed: {BRIDGE_FILE}" in report.lines and farm.log("kvm0", "ifup") == []
    again = setup(cluster, "kvm0", farm.ssh_config)
    assert again.error is None and "network (ifupdown): unchanged" in again.lines


@pytest.mark.services
@pytest.mark.slow
def test_ifupdown_says_which_interfaces_ifup_left_as_they_were(example: Cluster, farm: sshfarm.Farm) -> None:
    # ifup skips an interface that is up ("already configured", exit 0): a change to br0 did nothing until the next
    # boot, while the run said "ran: ifup -- br60 br0" and dropped the mark, as if applied.
    cluster = _with_host(example, network_stack="ifupdown", disk_dir="/var/lib/kvmconf-test-images")
    (farm.root("kvm0") / BRIDGE_FILE.lstrip("/")).unlink(missing_ok=True)
    state = farm.root("kvm0") / "run/network/ifstate"  # ifupdown's, which the real ifquery there reads
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("lo=lo\nbr0=br0\n")
    try:
        farm.clear_logs()
        report = setup(cluster, "kvm0", farm.ssh_config)
    finally:
        state.unlink()
    assert report.error is None, report.lines
    assert farm.log("kvm0", "ifup") == ["-- br60 br0"]
    assert report.lines[-3:-1] == [
        "network (ifupdown): ran: ifup -- br60 br0",
        "network (ifupdown): br0 already up, which ifup leaves as they are: what this change does to them applies at"
        " the next boot, or at `ifdown <name> && ifup <name>` (which takes a bridge's VMs off it until they restart)"]


@pytest.mark.services
@pytest.mark.slow
def test_a_directory_below_an_unmounted_fstab_mount_point_is_not_created(example: Cluster,
                                                                         farm: sshfarm.Farm) -> None:
    # The backups' NAS was not mounted: kvm-setup made the [backup] dir on the filesystem beneath (/), which the
    # backups then filled, and the backup's "the [backup] dir does not exist (is its filesystem mounted?)" check,
    # there to catch exactly that, never fired again.
    nas = "/srv/kvmconf-test-nas"
    backup = dataclasses.replace(example.site.backup, dir=f"{nas}/vms")
    cluster = _with_host(dataclasses.replace(example, site=dataclasses.replace(example.site, backup=backup)),
                         disk_dir="/var/lib/kvmconf-test-images")
    fstab = farm.root("kvm0") / "etc/fstab"
    original = fstab.read_bytes()
    fstab.write_bytes(original + f"nas.example.invalid:/backups {nas} nfs defaults 0 0\n".encode())
    try:
        dry = setup(cluster, "kvm0", farm.ssh_config, dry_run=True)
        report = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    finally:
        fstab.write_bytes(original)
    refused = (f"directories: {nas}/vms (dir of [backup] in site.toml) lies below {nas}, a mount point of /etc/fstab"
               " that is not mounted: mount it, then run again")
    assert dry.error == report.error == refused
    assert not (farm.root("kvm0") / nas.lstrip("/")).exists()
    # The others are created all the same (when an earlier test has not).
    assert report.lines[-1] in ("directories: present", "directories: created /var/lib/kvmconf-test-images")


@pytest.mark.services
@pytest.mark.slow
def test_each_line_is_handed_on_as_soon_as_its_step_is_done(example: Cluster, farm: sshfarm.Farm) -> None:
    # The lines came all at once at the end: nothing showed while apt-get installed QEMU and libvirt for minutes.
    sysctl = farm.root("kvm0") / SYSCTL.lstrip("/")
    sysctl.unlink(missing_ok=True)
    seen: list[tuple[str, bool]] = []  # each line, and whether the settings step had put its file in place by then
    report = setup(_with_host(example, disk_dir="/var/lib/kvmconf-test-images"), "kvm0", farm.ssh_config,
                   network_dry_run=True, progress=lambda line: seen.append((line, sysctl.exists())))
    assert report.error is None, report.lines
    assert [line for line, _ in seen] == report.lines
    assert seen[0][0].startswith("packages: ") and not seen[0][1]
    assert seen[1][0].startswith(f"settings: changed: {SYSCTL}") and seen[1][1]  # (MODULES too, when first)


@pytest.mark.services
@pytest.mark.slow
def test_an_ssh_error_midway_is_the_reports_error_and_the_lines_done_are_kept(example: Cluster,
                                                                              farm: sshfarm.Farm) -> None:
    # The settings files are pushed over SFTP, which the host's sshd refuses: paramiko's SSHException, no OSError,
    # escaped setup() as a traceback, and the packages line (a step done) was never printed.
    for path in (SYSCTL, MODULES):
        (farm.root("kvm0") / path.lstrip("/")).unlink(missing_ok=True)
    cluster = _with_host(example, disk_dir="/var/lib/kvmconf-test-images")
    with sshfarm.reconfigured(farm, "kvm0", sshfarm.SFTP_REFUSED):
        report = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    assert report.error == "ssh: SSHException: Channel closed."
    assert len(report.lines) == 1 and report.lines[0].startswith("packages: "), report.lines
    assert not (farm.root("kvm0") / SYSCTL.lstrip("/")).exists()


@pytest.mark.services
@pytest.mark.slow
def test_a_setting_whose_apply_failed_is_applied_by_the_next_run_although_its_file_is_unchanged(
        example: Cluster, farm: sshfarm.Farm) -> None:
    # The file is in place once `sysctl -p` fails: without a mark of what is still to apply, the next run found
    # "settings: unchanged" and exited 0 with the setting never applied (the same for ifup and the bridges).
    cluster = _with_host(example, disk_dir="/var/lib/kvmconf-test-images")
    assert setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True).error is None
    (farm.root("kvm0") / SYSCTL.lstrip("/")).unlink()
    stub = farm.root("kvm0") / "usr/local/sbin/sysctl"
    working = stub.read_text()
    try:
        stub.write_text(working + "echo 'sysctl: permission denied on key \"net.ipv4.ip_forward\"' >&2\nexit 1\n")
        failed = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    finally:
        stub.write_text(working)
    assert failed.error == (f"settings: sysctl -q -p {SYSCTL}: exit 1: sysctl: permission denied on key"
                            ' "net.ipv4.ip_forward"')
    assert failed.lines[1:] == [f"settings: changed: {SYSCTL}"]
    farm.clear_logs()
    dry = setup(cluster, "kvm0", farm.ssh_config, dry_run=True)
    owed = f"settings: unchanged; not applied yet (an earlier run stopped first): {SYSCTL}"
    assert dry.lines[1:3] == [owed, f"settings: would run: sysctl -q -p {SYSCTL}"]
    again = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    assert again.error is None and again.lines[1:3] == [owed, f"settings: ran: sysctl -q -p {SYSCTL}"]
    assert farm.log("kvm0", "sysctl") == [f"-q -p {SYSCTL}"] and farm.log("kvm0", "modprobe") == []
    farm.clear_logs()
    done = setup(cluster, "kvm0", farm.ssh_config, network_dry_run=True)
    assert done.lines[1] == "settings: unchanged" and farm.log("kvm0", "sysctl") == []
