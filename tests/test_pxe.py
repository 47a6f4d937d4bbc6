"""pxelinux and GRUB network boot configs: golden files, which MACs get an installer, per-loader quoting."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path, PurePosixPath

import pytest

from generators import pxe
from generators.model import Boot, Cluster, Install
from generators.urls import preseed_url
from generators.validate import load_cluster
from tests.golden import assert_golden

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
