"""Debian installer answers for every install=pxe VM: build/preseed/<vm>.cfg.

The installer fetches the file from <http_url>/preseed/<vm>.cfg (the url= on the kernel line that
generators/pxe.py writes). Passwords are crypt(3) hashes from site.toml, never plain text.
debconf-set-selections checks only the line format, not question names, so :data:`QUESTIONS` lists
every question the template may emit and :func:`lint` (run by the tests on every variant) refuses
any other: a misspelt name would otherwise be ignored silently and the install would stop at it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from generators.cloud_init import created_login_user
from generators.dnsmasq import dns_servers
from generators.model import Boot, Cluster, Install, Vm
from generators.render import banner_lines, environment
from generators.urls import installed_url, preseed_url

TEMPLATE = "preseed.cfg.j2"
OUT = PurePosixPath("preseed")

LOCKED = "!"  # site.toml's value for an account without a password

# (owner, question) -> type of every answer the template may emit.
QUESTIONS: dict[tuple[str, str], str] = {
    ("d-i", "debian-installer/locale"): "string",
    ("d-i", "keyboard-configuration/xkb-keymap"): "select",
    ("d-i", "preseed/early_command"): "string",
    ("d-i", "netcfg/choose_interface"): "select",
    ("d-i", "netcfg/disable_autoconfig"): "boolean",
    ("d-i", "netcfg/get_ipaddress"): "string",
    ("d-i", "netcfg/get_netmask"): "string",
    ("d-i", "netcfg/get_gateway"): "string",
    ("d-i", "netcfg/no_default_route"): "boolean",
    ("d-i", "netcfg/get_nameservers"): "string",
    ("d-i", "netcfg/confirm_static"): "boolean",
    ("d-i", "netcfg/get_hostname"): "string",
    ("d-i", "netcfg/get_domain"): "string",
    ("d-i", "netcfg/hostname"): "string",
    ("d-i", "mirror/country"): "string",
    ("d-i", "mirror/http/hostname"): "string",
    ("d-i", "mirror/http/directory"): "string",
    ("d-i", "mirror/http/proxy"): "string",
    ("d-i", "clock-setup/utc"): "boolean",
    ("d-i", "time/zone"): "string",
    ("d-i", "partman-auto/disk"): "string",
    ("d-i", "partman-auto/method"): "string",
    ("d-i", "partman-lvm/device_remove_lvm"): "boolean",
    ("d-i", "partman-md/device_remove_md"): "boolean",
    ("d-i", "partman-auto/expert_recipe"): "string",
    ("d-i", "partman-efi/non_efi_system"): "boolean",
    ("d-i", "partman-partitioning/confirm_write_new_label"): "boolean",
    ("d-i", "partman/choose_partition"): "select",
    ("d-i", "partman/confirm"): "boolean",
    ("d-i", "partman/confirm_nooverwrite"): "boolean",
    ("d-i", "passwd/root-login"): "boolean",
    ("d-i", "passwd/root-password-crypted"): "password",
    ("d-i", "passwd/make-user"): "boolean",
    ("d-i", "passwd/user-fullname"): "string",
    ("d-i", "passwd/username"): "string",
    ("d-i", "passwd/user-password-crypted"): "password",
    ("tasksel", "tasksel/first"): "multiselect",
    ("d-i", "pkgsel/include"): "string",
    ("popularity-contest", "popularity-contest/participate"): "boolean",
    ("d-i", "grub-installer/only_debian"): "boolean",
    ("d-i", "grub-installer/with_other_os"): "boolean",
    ("d-i", "grub-installer/bootdev"): "string",
    ("d-i", "grub-installer/force-efi-extra-removable"): "boolean",
    ("d-i", "preseed/late_command"): "string",
    ("d-i", "finish-install/reboot_in_progress"): "note",
}

# partman counts in MB of 10^6 bytes; a disk of N GB (qemu-img and lvcreate make GiB) holds at least N * 1000.
MB_PER_GB = 1000
EFI_MB = 512
SWAP_MAX_MB = 4096
ROOT_MIN_MB = 2048  # a standard system with ssh-server needs about 1.5 GB


@dataclass(frozen=True)
class Layout:
    """The partitions of /dev/vda in MB: EFI system partition (UEFI only), swap, and / with all the rest."""

    efi_mb: int
    swap_mb: int
    root_min_mb: int


def partition_layout(vm: Vm) -> Layout:
    """Swap = min(RAM, 4 GB), but at most a quarter of the disk; / gets the rest and at least what fits."""
    budget = vm.disk.size_gb * MB_PER_GB
    efi = EFI_MB if vm.boot is Boot.UEFI else 0
    swap = min(vm.ram_mb, SWAP_MAX_MB, max(1, (budget - efi) // 4))
    # The minimums must fit the disk or partman refuses the recipe; / grows into everything left anyway.
    root_min = max(1, min(ROOT_MIN_MB, budget - efi - swap))
    return Layout(efi, swap, root_min)


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    site = cluster.site
    accounts = site.accounts
    template = environment().get_template(TEMPLATE)
    banner = banner_lines(cluster, TEMPLATE)
    nameservers = {name: " ".join(str(ip) for ip in dns_servers(cluster, net)) for name, net in site.networks.items()}
    # Shell words for the late_command, quoted once: a key's comment may hold anything but a newline.
    keys = [shlex.quote(key) for key in accounts.ssh_keys]
    sudoers_line = shlex.quote(f"{accounts.admin_user} ALL=(ALL) NOPASSWD:ALL")
    login_user = created_login_user(accounts)
    # Who gets the SSH keys: root only when `ssh <vm>` logs in as root, as cloud-init does (README: ssh_keys).
    homes = [("/root", "root")] if accounts.ssh_user == "root" else []
    homes += [(f"/home/{accounts.admin_user}", accounts.admin_user)]
    homes += [(f"/home/{login_user}", login_user)] if login_user else []
    tree: dict[PurePosixPath, str | bytes] = {}
    for vm in cluster.vms:
        if vm.install is not Install.PXE:
            continue
        tree[OUT / f"{vm.name}.cfg"] = template.render(
            banner=banner, site=site, provision=site.provision, vm=vm, fqdn=cluster.fqdn(vm),
            os=cluster.os_of(vm), net=cluster.network_of(vm), nameservers=nameservers[vm.network],
            url=preseed_url(cluster, vm), uefi=vm.boot is Boot.UEFI, layout=partition_layout(vm),
            root_hash=accounts.root_password_hash, admin=accounts.admin_user,
            admin_hash=accounts.admin_password_hash, locked=LOCKED, keys=keys, sudoers_line=sudoers_line,
            homes=homes, login_user=login_user, login_sudoers_line=shlex.quote(f"{login_user} ALL=(ALL) NOPASSWD:ALL"),
            # A shell word: http_url's path may hold characters the shell reads (' $ ;), which URLs allow.
            installed_url=installed_url(cluster, vm), installed_url_word=shlex.quote(installed_url(cluster, vm)),
        )
    return tree


def answers(text: str) -> list[tuple[int, str, str, str]]:
    """(line, owner, question, type) of every answer in a preseed, read as debconf-set-selections reads it:
    `#` lines and blank lines skipped, a line ending in a backslash joined with the next."""
    found = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index]
        while line.endswith("\\") and index + 1 < len(lines):
            index += 1
            line = line[:-1] + lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        owner, question, kind = [*line.split(None, 3), "", "", ""][:3]
        found.append((number, owner, question, kind))
    return found


def lint(text: str) -> list[str]:
    """Problems with the answers of a preseed: questions not in QUESTIONS, wrong types, answers given twice."""
    problems = []
    seen: set[str] = set()
    for number, owner, question, kind in answers(text):
        expected = QUESTIONS.get((owner, question))
        if expected is None:
            problems.append(f"line {number}: {owner} {question} is not a known installer question")
        elif kind != expected:
            problems.append(f"line {number}: {question} has type {kind!r} (expected {expected!r})")
        if question in seen:
            problems.append(f"line {number}: {question} is answered twice")
        seen.add(question)
    return problems
