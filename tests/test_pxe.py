"""pxelinux and GRUB network boot configs: golden files, which MACs get an installer, per-loader quoting."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from generators import pxe
from generators.model import Boot, Cluster, Install
from generators.urls import preseed_url
from generators.validate import load_cluster
from kvmconf import provision_server, tftp_tree
from kvmconf.errors import KvmconfError
from tests.golden import assert_golden
from tests.tools import missing, require_tool, run

PXELINUX = PurePosixPath("tftp/pxelinux.cfg")
GRUB = PurePosixPath("tftp/grub")


def _text(tree: dict[PurePosixPath, str | bytes], path: PurePosixPath) -> str:
    content = tree[path]
    assert isinstance(content, str)
    return content


def _directive(text: str, keyword: str) -> str:
    """The rest of the one line that starts with ``keyword`` (after indentation)."""
    lines = [line.strip() for line in text.splitlines()]
    found = [line[len(keyword):].strip() for line in lines if line.startswith(keyword + " ")]
    assert len(found) == 1, f"expected one {keyword!r} line in:\n{text}"
    return found[0]


def _every_kind(cluster: Cluster) -> Cluster:
    """The example plus a BIOS and a UEFI VM for every install kind, so each case is there."""
    extra = []
    for number, (install, boot) in enumerate((i, b) for i in Install for b in Boot):
        base = cluster.vm("ldap")
        extra.append(dataclasses.replace(base, name=f"k{number}", mac=f"52:54:00:aa:bb:{number:02x}",
                                         install=install, boot=boot, line=base.line + 100 + number))
    return dataclasses.replace(cluster, vms=(*cluster.vms, *extra))


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("pxe", pxe.render(example), regenerate)


def test_only_pxe_vms_get_a_boot_config_for_their_own_firmware(example: Cluster) -> None:
    cluster = _every_kind(example)
    tree = pxe.render(cluster)
    expected = {PXELINUX / "default", GRUB / "grub.cfg"}
    for vm in cluster.vms:
        if vm.install is Install.PXE and vm.boot is Boot.BIOS:
            expected.add(PXELINUX / f"01-{vm.mac_dashes}")
        elif vm.install is Install.PXE:
            expected |= {GRUB / f"grub.cfg-01-{vm.mac_dashes}", GRUB / f"grub.cfg-{vm.mac_dashes}",
                         GRUB / f"grub.cfg-{vm.mac}"}
    assert set(tree) == expected
    for vm in cluster.vms:
        mentioned = [path for path, text in tree.items() if vm.mac_dashes in str(path) or vm.mac in str(path)
                     or f"url={preseed_url(cluster, vm)}" in str(text)]
        assert bool(mentioned) == (vm.install is Install.PXE), vm.name


def test_file_names_are_lower_case_as_pxelinux_needs(tmp_path: Path) -> None:
    # pxelinux asks for 01-<mac> in lower case only; an upper-case MAC in cluster.conf must not change that.
    inventory = tmp_path / "cluster.conf"
    inventory.write_text(Path("cluster.conf").read_text().replace("52:54:00:50:00:10", "52:54:00:50:00:AB"))
    names = {path.name for path in pxe.render(load_cluster(inventory, Path("site.toml")))}
    assert "01-52-54-00-50-00-ab" in names
    assert all(name == name.lower() for name in names)


def test_grub_variants_are_identical(example: Cluster) -> None:
    tree = pxe.render(example)
    web = example.vm("web")
    variants = {tree[GRUB / name] for name in (f"grub.cfg-01-{web.mac_dashes}", f"grub.cfg-{web.mac_dashes}",
                                                f"grub.cfg-{web.mac}")}
    assert len(variants) == 1


def test_both_loaders_pass_the_same_kernel_arguments(example: Cluster) -> None:
    tree = pxe.render(example)
    for vm in example.vms:
        if vm.install is not Install.PXE:
            continue
        args = list(pxe.installer_args(example, vm))
        release = example.os_of(vm)
        assert f"url={preseed_url(example, vm)}" in args and args[-1] == "---"
        assert {f"hostname={vm.name}", f"domain={example.site.domain}", "auto=true", "priority=critical",
                "interface=auto", "netcfg/dhcp_timeout=60"} <= set(args)
        if vm.boot is Boot.BIOS:
            text = _text(tree, PXELINUX / f"01-{vm.mac_dashes}")
            assert _directive(text, "KERNEL") == release.kernel
            assert _directive(text, "INITRD") == release.initrd
            assert _directive(text, "APPEND").split(" ") == args
        else:
            text = _text(tree, GRUB / f"grub.cfg-{vm.mac}")
            # GRUB's quoting is the shell's single-quote rule, so shlex reads the words back.
            assert shlex.split(_directive(text, "linux")) == ["/" + release.kernel, *args]
            assert shlex.split(_directive(text, "initrd")) == ["/" + release.initrd]


def test_grub_quotes_semicolons_and_pxelinux_does_not() -> None:
    args = ["ds=nocloud;s=http://192.168.50.2/cloud-init/web/", "auto=true", "x=it's", "---"]
    assert pxe.grub_args(args) == "'ds=nocloud;s=http://192.168.50.2/cloud-init/web/' auto=true 'x=it'\\''s' ---"
    assert shlex.split(pxe.grub_args(args)) == args
    assert pxe.pxelinux_append(args) == "ds=nocloud;s=http://192.168.50.2/cloud-init/web/ auto=true x=it's ---"
    assert pxe.grub_word("$prefix") == "'$prefix'"


def test_pxelinux_refuses_an_argument_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="cannot carry the kernel argument 'a b'"):
        pxe.pxelinux_append(["auto=true", "a b"])


def test_defaults_never_start_an_installer(example: Cluster) -> None:
    tree = pxe.render(example)
    default = _text(tree, PXELINUX / "default")
    assert _directive(default, "DEFAULT") == "local"
    assert _directive(default, "LOCALBOOT") == "0"
    assert "KERNEL" not in default and "APPEND" not in default
    grub = _text(tree, GRUB / "grub.cfg")
    commands = [line for line in grub.splitlines() if line and not line.startswith("#")]
    assert commands == ["configfile $prefix/grub.cfg-$net_default_mac", "exit"]


# --- real consumers: grub-script-check, and the boot chains under QEMU -----------------------------------------


@pytest.mark.consumer
def test_grub_script_check_accepts_every_grub_file(example: Cluster, tmp_path: Path) -> None:
    check = require_tool("grub-script-check")
    tree = pxe.render(_every_kind(example))
    grub_files = [path for path in tree if path.parent == GRUB]
    assert len(grub_files) > 1
    for path in grub_files:
        staged = tmp_path / path.name
        staged.write_text(_text(tree, path))
        result = run([check, str(staged)])
        assert (result.returncode, result.stderr) == (0, ""), path


@pytest.mark.consumer
def test_grub_script_check_catches_an_unclosed_quote(example: Cluster, tmp_path: Path) -> None:
    web = example.vm("web")
    text = _text(pxe.render(example), GRUB / f"grub.cfg-{web.mac}").replace(" auto=true", " 'auto=true")
    staged = tmp_path / "broken.cfg"
    staged.write_text(text)
    result = run([require_tool("grub-script-check"), str(staged)])
    assert result.returncode != 0
    assert "syntax error" in result.stderr


OVMF = Path("/usr/share/ovmf/OVMF.fd")
UNKNOWN_MAC = "52:54:00:99:99:99"


@dataclass(frozen=True)
class Deployed:
    """What the provision server serves for network boots: its TFTP root and dnsmasq's boot file per firmware."""

    tftp_root: Path
    boot_file: dict[bool, str]  # uefi? -> the file dnsmasq.conf's dhcp-boot names


def _deploy(cluster: Cluster, tmp_path: Path) -> Deployed:
    """The TFTP root as the provision server deploys it (build/tftp, the loaders, the installer), and the boot files
    of the dnsmasq.conf built with it: the guest gets what a real deploy would give it."""
    build = provision_server.stage_build(cluster, tmp_path / "kvmconf")
    root = tmp_path / "tftp"
    tftp_tree.assemble_tftp(cluster, build, root)
    boot_file: dict[bool, str] = {}
    for line in (build / "dnsmasq/dnsmasq.conf").read_text().splitlines():
        if line.startswith("dhcp-boot=tag:"):
            tag, _, file = line.removeprefix("dhcp-boot=tag:").partition(",")
            boot_file[tag == "efi-x86_64"] = file
    assert set(boot_file) == {True, False}, boot_file
    return Deployed(root, boot_file)


def _events(pcap: Path) -> list[str]:
    """TFTP read requests ("tftp <file>") and DHCP client vendor classes ("dhcp <class>") in a pcap file."""
    data = pcap.read_bytes() if pcap.exists() else b""
    events, pos = [], 24
    while pos + 16 <= len(data):
        (length,) = struct.unpack("<I", data[pos + 8:pos + 12])
        frame, pos = data[pos + 16:pos + 16 + length], pos + 16 + length
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:  # IPv4 + UDP only
            continue
        udp = frame[14 + (frame[14] & 15) * 4:]
        port, payload = struct.unpack(">H", udp[2:4])[0], udp[8:]
        if port == 69 and payload[:2] == b"\x00\x01":
            events.append("tftp " + payload[2:].split(b"\x00")[0].decode())
        elif port == 67:
            options, index = payload[240:], 0
            while index + 1 < len(options) and options[index] != 255:
                code, size = options[index], options[index + 1]
                if code == 60:
                    events.append("dhcp " + options[index + 2:index + 2 + size].decode(errors="replace"))
                index += 2 + size if code else 1
    return events


def _boot(tmp_path: Path, deployed: Deployed, mac: str, uefi: bool, done: Callable[[list[str]], bool],
          timeout: float = 240.0) -> list[str]:
    """Boot a diskless guest from the network under QEMU until done(events) or timeout; return the events.

    User-mode networking with restrict=on: QEMU's own DHCP and TFTP server, nothing leaves the process.
    """
    pcap = tmp_path / f"{mac.replace(':', '')}.pcap"
    argv = [require_tool("qemu-system-x86_64"), "-m", "1024", "-display", "none", "-monitor", "none",
            "-serial", "none", "-boot", "n",
            "-netdev", f"user,id=n0,restrict=on,tftp={deployed.tftp_root},bootfile={deployed.boot_file[uefi]}",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
            "-object", f"filter-dump,id=dump,netdev=n0,file={pcap}"]
    if uefi:
        firmware = tmp_path / "OVMF.fd"  # a copy: OVMF writes its variables into the image
        shutil.copy(OVMF, firmware)
        argv += ["-machine", "q35", "-bios", str(firmware)]
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and qemu.poll() is None and not done(_events(pcap)):
            time.sleep(0.5)
        assert qemu.poll() is None, f"qemu exited: {qemu.communicate()[1]}"
        return _events(pcap)
    finally:
        qemu.kill()
        qemu.wait()


def _boot_requirements(cluster: Cluster) -> None:
    """What the provision server's deploy and the boots need on this machine, reported as missing (not as errors)."""
    require_tool("grub-mknetdir")
    for release in cluster.site.oses.values():
        try:
            tftp_tree.netboot_dir(release.suite)  # the installer's kernel and initrd
        except KvmconfError as err:
            missing(f"{err} (make test-deps installs it)")
    for path in (OVMF, tftp_tree.GRUB_EFI_MODULES, *map(Path, pxe.BIOS_LOADER_FILES.values())):
        if not path.exists():
            missing(f"{path} is missing (make test-deps installs it)")


@pytest.mark.consumer
@pytest.mark.slow
@pytest.mark.parametrize("boot", list(Boot))
def test_a_pxe_vm_boots_into_the_installer(example: Cluster, tmp_path: Path, boot: Boot) -> None:
    _boot_requirements(example)
    vm = example.vm("web" if boot is Boot.UEFI else "ldap")
    assert vm.boot is boot and vm.install is Install.PXE
    release = example.os_of(vm)
    deployed = _deploy(example, tmp_path)
    # The loader ran our `linux`/KERNEL and `initrd`/INITRD lines once it asks for the initrd. (Booted on, the
    # installer sends its own DHCP request about 100 s later under emulation; too slow to wait for here.)
    config = f"/grub/grub.cfg-01-{vm.mac_dashes}" if boot is Boot.UEFI else f"pxelinux.cfg/01-{vm.mac_dashes}"
    kernel, initrd = (f"/{release.kernel}", f"/{release.initrd}") if boot is Boot.UEFI else (release.kernel,
                                                                                             release.initrd)
    events = _boot(tmp_path, deployed, vm.mac, boot is Boot.UEFI, lambda events: f"tftp {initrd}" in events)
    fetched = [event.removeprefix("tftp ") for event in events if event.startswith("tftp ")]
    assert initrd in fetched, events
    assert fetched.index(config) < fetched.index(kernel) < fetched.index(initrd)


@pytest.mark.consumer
@pytest.mark.slow
@pytest.mark.parametrize("boot", list(Boot))
def test_an_unknown_mac_gets_no_installer(example: Cluster, tmp_path: Path, boot: Boot) -> None:
    _boot_requirements(example)
    deployed = _deploy(example, tmp_path)
    if boot is Boot.UEFI:
        # GRUB read grub.cfg, found no grub.cfg-<mac>, and left: the firmware starts its next boot entry.
        last = f"tftp /grub/grub.cfg-{UNKNOWN_MAC}"
        events = _boot(tmp_path, deployed, UNKNOWN_MAC, True,
                       lambda events: last in events and events[-1].startswith("dhcp "))
        assert last in events and events[-1].startswith("dhcp "), events
    else:
        # pxelinux read the default file; give it time to fetch a kernel, which it must not.
        seen: list[float] = []

        def settled(events: list[str]) -> bool:
            if "tftp pxelinux.cfg/default" in events and not seen:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] > 15

        events = _boot(tmp_path, deployed, UNKNOWN_MAC, False, settled)
        assert "tftp pxelinux.cfg/default" in events, events
    assert not any("debian-installer" in event for event in events), events
