"""Per-MAC network boot configs: build/tftp/pxelinux.cfg/* (BIOS) and build/tftp/grub/* (UEFI).

Only VMs with install=pxe get a file, and only for their own firmware (boot=bios: pxelinux,
boot=uefi: GRUB). Any other MAC falls to the defaults, which boot the local disk (pxelinux) or
leave GRUB for the firmware's next boot device: a machine not in cluster.conf never gets an
installer. The installer's kernel line is one list of arguments (:func:`installer_args`) that each
loader writes in its own syntax (:func:`pxelinux_append`, :func:`grub_args`).

Besides these files and the installer kernel/initrd of each [os.*] in site.toml, the TFTP root
needs (dnsmasq.conf names the first and the last as boot files):

  pxelinux.0, ldlinux.c32    from packages pxelinux and syslinux-common, see BIOS_LOADER_FILES
  grub/grubx64.efi           a GRUB EFI image whose prefix is /grub, made with package grub-efi-amd64-bin:
                               grub-mknetdir -d /usr/lib/grub/x86_64-efi --net-directory=<tftp_root> --subdir=grub
                               cp <tftp_root>/grub/x86_64-efi/core.efi <tftp_root>/grub/grubx64.efi
                             (modules then load from grub/x86_64-efi/). Debian's netboot grubx64.efi does not
                             fit: its built-in prefix is /debian-installer/amd64/grub, so it never reads ours.
                             Checked under QEMU + OVMF: the VM's MAC got grub.cfg-01-<mac> and the installer,
                             another MAC read grub.cfg and went on to the firmware's next boot entry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePosixPath

from generators.model import Boot, Cluster, Install, Vm
from generators.render import banner_lines, environment
from generators.urls import preseed_url

PXELINUX_TEMPLATE = "pxelinux-install.cfg.j2"
PXELINUX_DEFAULT_TEMPLATE = "pxelinux-default.cfg.j2"
GRUB_TEMPLATE = "grub-install.cfg.j2"
GRUB_MAIN_TEMPLATE = "grub.cfg.j2"

# The TFTP root's layout, relative to that root. pxelinux and GRUB look these names up, and
# kvmconf.tftp_tree assembles and prunes the deployed root by them: each is spelled here only.
BUILD_DIR = PurePosixPath("tftp")  # where render() puts the generated part of the TFTP root (under build/)
PXELINUX_BOOT_FILE = "pxelinux.0"  # the BIOS boot file (dnsmasq.conf's dhcp-boot), from package pxelinux
PXELINUX_LDLINUX = "ldlinux.c32"  # the module pxelinux.0 loads from beside it, from package syslinux-common
PXELINUX_CFG_DIR = "pxelinux.cfg"  # pxelinux.0 reads its configs from this directory beside it
PXELINUX_DEFAULT = f"{PXELINUX_CFG_DIR}/default"
GRUB_DIR = "grub"  # the GRUB image's prefix: it reads grub.cfg and its per-MAC files here, and loads modules below
GRUB_CFG_NAME = "grub.cfg"  # GRUB reads $prefix/grub.cfg; the per-MAC ones are grub.cfg-<mac> beside it
GRUB_CFG = f"{GRUB_DIR}/{GRUB_CFG_NAME}"
GRUB_MAC_CFG = f"{GRUB_CFG}-"  # + a MAC spelling: GRUB's per-MAC config (see grub_entries)
GRUB_PLATFORM = "x86_64-efi"  # GRUB's module directory name, in /usr/lib/grub/ and (by grub-mknetdir) in GRUB_DIR
GRUB_CORE_EFI = f"{GRUB_DIR}/{GRUB_PLATFORM}/core.efi"  # the image grub-mknetdir --subdir=GRUB_DIR makes
GRUB_EFI_IMAGE = f"{GRUB_DIR}/grubx64.efi"  # the UEFI boot file (dnsmasq.conf's dhcp-boot), a copy of GRUB_CORE_EFI
PER_MAC_DIRS = (PXELINUX_CFG_DIR, GRUB_DIR)  # where the per-MAC entries are
ETHERNET = "01-"  # the ARP hardware type of Ethernet, which pxelinux (and Debian's GRUB) put before the MAC
# Any per-MAC entry name boot_entries can give, relative to the TFTP root: a deploy removes the ones the
# build no longer has (kvmconf.tftp_tree).
PER_MAC_ENTRY = re.compile(rf"({re.escape(f'{PXELINUX_CFG_DIR}/{ETHERNET}')}|{re.escape(GRUB_MAC_CFG)}"
                           rf"({re.escape(ETHERNET)})?)[0-9a-f]{{2}}([-:][0-9a-f]{{2}}){{5}}")


def pxelinux_entry(mac: str) -> str:
    """pxelinux looks for "01-" (the ARP type of Ethernet) + the MAC in lower case with dashes."""
    return f"{PXELINUX_CFG_DIR}/{ETHERNET}{mac.lower().replace(':', '-')}"


def grub_entries(mac: str) -> list[str]:
    """GRUB's own per-MAC search reads "01-" + dashes (Debian 2.06, seen under OVMF; Red Hat) or dashes
    (upstream); our grub.cfg reads the colon form ($net_default_mac). Same content in all three."""
    mac = mac.lower()
    dashes = mac.replace(":", "-")
    return [f"{GRUB_MAC_CFG}{ETHERNET}{dashes}", f"{GRUB_MAC_CFG}{dashes}", f"{GRUB_MAC_CFG}{mac}"]


def boot_entries(mac: str) -> list[str]:
    """Every per-MAC boot config a VM with this MAC may have, relative to the TFTP root (both loaders)."""
    return [pxelinux_entry(mac), *grub_entries(mac)]


# TFTP root path -> the Debian 12 file to copy there (BIOS boot chain; pxelinux.0 loads ldlinux.c32 beside it).
BIOS_LOADER_FILES = {
    PXELINUX_BOOT_FILE: "/usr/lib/PXELINUX/pxelinux.0",
    PXELINUX_LDLINUX: "/usr/lib/syslinux/modules/bios/ldlinux.c32",
}

# GRUB splits words at these and expands `$`; a word holding one must be quoted (`;` would end the command).
_GRUB_SPECIAL = re.compile(r"[\s;&|<>$\"'\\{}#]")


def installer_args(cluster: Cluster, vm: Vm) -> tuple[str, ...]:
    """The Debian installer's kernel arguments for a VM, before any loader's quoting.

    auto=true delays the locale/keyboard questions until the preseed at url= is read, and
    priority=critical keeps every lower question unasked. hostname= and domain= answer the network
    questions asked before the preseed is fetched. BOOTIF= (what pxelinux's IPAPPEND 2 would add, written
    out so GRUB passes it too) makes the installer use the NIC that booted when the VM has several.
    Arguments after `---` would be copied into the installed system's boot loader: there are none.
    """
    return (
        "auto=true",
        "priority=critical",
        f"url={preseed_url(cluster, vm)}",
        f"hostname={vm.name}",
        f"domain={cluster.site.domain}",
        "interface=auto",
        f"BOOTIF=01-{vm.mac_dashes}",
        "netcfg/dhcp_timeout=60",
        # The domains are headless (`virsh console` is the screen): the installer talks on the serial port.
        "console=ttyS0,115200n8",
        "---",
    )


def pxelinux_append(args: Sequence[str]) -> str:
    """pxelinux APPEND: the words as they are. pxelinux has no quoting: a quote would reach the kernel line."""
    for arg in args:
        if not arg or any(c.isspace() for c in arg):
            raise ValueError(f"a pxelinux APPEND line cannot carry the kernel argument {arg!r}")
    return " ".join(args)


def grub_word(word: str) -> str:
    """One GRUB script word: single-quoted when it holds a character GRUB would act on (`;`, `$`, spaces...)."""
    if word and not _GRUB_SPECIAL.search(word):
        return word
    # Inside single quotes GRUB takes everything literally; a quote itself is closed, escaped, reopened.
    return "'" + word.replace("'", "'\\''") + "'"


def grub_args(args: Sequence[str]) -> str:
    """GRUB `linux` arguments: each word quoted as GRUB needs (e.g. `"ds=nocloud;s=..."` must not split)."""
    return " ".join(grub_word(arg) for arg in args)


def _tftp_path(path: str) -> str:
    """site.toml's kernel/initrd paths are relative to the TFTP root; GRUB needs them absolute on its root."""
    return "/" + path.lstrip("/")


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    env = environment()
    site = cluster.site
    tree: dict[PurePosixPath, str | bytes] = {
        BUILD_DIR / PXELINUX_DEFAULT: env.get_template(PXELINUX_DEFAULT_TEMPLATE).render(
            banner=banner_lines(cluster, PXELINUX_DEFAULT_TEMPLATE), site=site),
        BUILD_DIR / GRUB_CFG: env.get_template(GRUB_MAIN_TEMPLATE).render(
            banner=banner_lines(cluster, GRUB_MAIN_TEMPLATE), site=site, grub_cfg=GRUB_CFG_NAME),
    }
    pxelinux = env.get_template(PXELINUX_TEMPLATE)
    pxelinux_banner = banner_lines(cluster, PXELINUX_TEMPLATE)
    grub = env.get_template(GRUB_TEMPLATE)
    grub_banner = banner_lines(cluster, GRUB_TEMPLATE)
    for vm in cluster.vms:
        if vm.install is not Install.PXE:
            continue
        release = cluster.os_of(vm)
        args = installer_args(cluster, vm)
        if vm.boot is Boot.BIOS:
            tree[BUILD_DIR / pxelinux_entry(vm.mac)] = pxelinux.render(
                banner=pxelinux_banner, vm=vm, fqdn=cluster.fqdn(vm), os=release, append=pxelinux_append(args))
        else:
            text = grub.render(
                banner=grub_banner, vm=vm, fqdn=cluster.fqdn(vm), os=release, args=grub_args(args),
                title=grub_word(f"Install {release.name} on {cluster.fqdn(vm)}"),
                kernel=grub_word(_tftp_path(release.kernel)), initrd=grub_word(_tftp_path(release.initrd)))
            for name in grub_entries(vm.mac):
                tree[BUILD_DIR / name] = text
    return tree
