"""Bad input, as a table: each case is the example cluster with a change, and the exact problems.

Every case asserts the complete, ordered list of problems (file, line, column, message), so it
also proves that nothing else is reported, that all problems come at once, and that they are
sorted. Messages are exact unless written as ``Re(...)`` (then they must match it entirely).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from generators.columns import NIC_GRAMMAR
from generators.errors import ConfigError
from generators.validate import load_cluster
from tests.tools import ROOT

EXAMPLE_CONF = (ROOT / "cluster.conf").read_text()
EXAMPLE_SITE = (ROOT / "site.toml").read_text()
NEW = EXAMPLE_CONF.count("\n") + 1  # the line number of the first line a case appends (12)

NAME_RULE = ("is not a valid VM name (expected an RFC 1123 label: lowercase letters, digits and '-', starting"
             " with a letter, not ending with '-', at most 63 characters)")
OPTION_KEYS = "host, install, os, disk, net, boot, cpuset, nic, numa, after, autostart, backup, keep"
FIELDS = "expected 7 or 8: name mac ip ram disk cpus hostgroups [options]"
AFTER_RULE = ("is not a VM defined above this line (expected names of earlier VMs: cluster.conf order is deployment"
              " order)")
DEVICES = ('interfaces = ["eno1", "eno2"]\npci = ["0000:1a:00.1"]\nsriov = {eno2 = 2}\n'
           'housekeeping_cpus = "0-1"\n')
HOSTGROUPS = "compute, databases, infrastructure, linux-servers, login-nodes, web-servers"
ANSIBLE_GROUP_RULE = ("a hostgroup whose Ansible group name, with each character other than a letter, digit or '_'"
                      " made '_', is not all, ungrouped, host_<physical host> or another hostgroup's")


@dataclass(frozen=True)
class Re:
    """An expected message given as a regular expression that must match all of it."""

    pattern: str


Expected = tuple[str, int, int, "str | Re"]  # file name, line, column, message


def _same(text: str) -> str:
    return text


@dataclass(frozen=True)
class Case:
    id: str
    expected: tuple[Expected, ...]
    conf: Callable[[str], str | bytes] = _same  # the example cluster.conf -> the case's
    site: Callable[[str], str | bytes] = _same  # the example site.toml -> the case's
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # more files; None makes a directory

    def __post_init__(self) -> None:
        # A bad-input case that does not say which message it expects proves nothing.
        if not self.expected:
            raise ValueError(f"case {self.id!r} has no expected problem")
        for file, line, col, message in self.expected:
            text = message.pattern if isinstance(message, Re) else message
            if not text.strip() or line < 0 or col < 0 or not file:
                raise ValueError(f"case {self.id!r}: every expected problem needs a file, line, column and message")


def vm(name: str = "new", mac: str = "52:54:00:50:00:99", ip: str = "192.168.50.99", ram: str = "1024",
       disk: str = "10", cpus: str = "1", groups: str = "-", options: str | None = "host=kvm1") -> str:
    """A valid new line; with the defaults its columns are: name 1, mac 5, ip 23, ram 37, disk 42,
    cpus 45, hostgroups 47, options 49."""
    fields = [name, mac, ip, ram, disk, cpus, groups] + ([] if options is None else [options])
    return "\t".join(fields)


def add(*lines: str) -> Callable[[str], str]:
    return lambda text: text + "".join(line + "\n" for line in lines)


def sub(old: str, new: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert text.count(old) == 1, f"{old!r} must occur once in the example"
        return text.replace(old, new)

    return change


def conf(line: int, col: int, message: str | Re) -> Expected:
    return ("cluster.conf", line, col, message)


def site(line: int, col: int, message: str | Re) -> Expected:
    return ("site.toml", line, col, message)


def site_line(start: str) -> int:
    """The line of the example site.toml that starts with ``start`` (messages that point into it from cluster.conf)."""
    return next(number for number, line in enumerate(EXAMPLE_SITE.split("\n"), 1) if line.startswith(start))


LDAP_LINE = next(line for line in EXAMPLE_CONF.split("\n") if line.startswith("ldap\t"))  # line 6
FIRST_LINE_END = EXAMPLE_CONF.index("\n") + 1  # the column of the first line's end
KVM0_LINE = site_line("[hosts.kvm0]")
KVM0_ADDRESS_LINE = site_line('address = "192.168.50.4"')
SITE_END = EXAMPLE_SITE.count("\n") + 1  # the line of the first line a case appends to site.toml


def option_problem(line: int, col: int, message: str) -> Expected:
    return conf(line, col, f"column 'options': {message}")


def devices(text: str) -> str:
    """The example site with host devices on kvm1."""
    return sub("[hosts.kvm1]\n", "[hosts.kvm1]\n" + DEVICES)(text)


CASES = [
    # --- one field at a time ----------------------------------------------------------------------
    Case("name-uppercase", (conf(NEW, 1, f"column 'name': 'Web' {NAME_RULE}"),), add(vm(name="Web"))),
    Case("name-digit-first", (conf(NEW, 1, f"column 'name': '1web' {NAME_RULE}"),), add(vm(name="1web"))),
    Case("name-trailing-hyphen", (conf(NEW, 1, f"column 'name': 'web-' {NAME_RULE}"),), add(vm(name="web-"))),
    Case("name-underscore", (conf(NEW, 1, f"column 'name': 'web_1' {NAME_RULE}"),), add(vm(name="web_1"))),
    Case("name-64-chars", (conf(NEW, 1, f"column 'name': '{'a' * 55}...' (64 characters) {NAME_RULE}"),),
         add(vm(name="a" * 64))),
    Case("name-with-space", (conf(NEW, 1, f"column 'name': 'my vm' {NAME_RULE} (fields are separated by tabs;"
                                          " is one missing?)"),), add(vm(name="my vm"))),
    Case("mac-not-hex", (conf(NEW, 5, "column 'mac': '52:54:00:zz:01:02' is not a MAC address (expected"
                                      " xx:xx:xx:xx:xx:xx)"),), add(vm(mac="52:54:00:zz:01:02"))),
    Case("mac-dashes", (conf(NEW, 5, "column 'mac': '52-54-00-50-00-99' is not a MAC address (expected"
                                     " xx:xx:xx:xx:xx:xx)"),), add(vm(mac="52-54-00-50-00-99"))),
    Case("mac-multicast", (conf(NEW, 5, "column 'mac': '01:00:5e:00:00:01' is a multicast MAC address (expected a"
                                        " unicast MAC, e.g. 52:54:00:xx:xx:xx)"),), add(vm(mac="01:00:5e:00:00:01"))),
    Case("mac-all-zero", (conf(NEW, 5, "column 'mac': '00:00:00:00:00:00' is the all-zero MAC address (expected a"
                                       " unicast MAC, e.g. 52:54:00:xx:xx:xx)"),), add(vm(mac="00:00:00:00:00:00"))),
    Case("ip-octet-too-big", (conf(NEW, 23, "column 'ip': '192.168.50.999' is not an IPv4 address (expected"
                                            " a.b.c.d)"),), add(vm(ip="192.168.50.999"))),
    Case("ip-leading-zero", (conf(NEW, 23, "column 'ip': '192.168.050.9' is not an IPv4 address (expected"
                                           " a.b.c.d)"),), add(vm(ip="192.168.050.9"))),
    Case("ram-zero", (conf(NEW, 37, "column 'ram': '0' is not a positive integer (expected RAM in MB, e.g."
                                    " 2048)"),), add(vm(ram="0"))),
    Case("ram-with-unit", (conf(NEW, 37, "column 'ram': '2G' is not a positive integer (expected RAM in MB, e.g."
                                         " 2048)"),), add(vm(ram="2G"))),
    Case("ram-negative", (conf(NEW, 37, "column 'ram': '-5' is not a positive integer (expected RAM in MB, e.g."
                                        " 2048)"),), add(vm(ram="-5"))),
    Case("ram-above-limit", (conf(NEW, 37, "column 'ram': '2147483648' is too large (expected RAM in MB, e.g. 2048,"
                                           " at most 2147483647)"),), add(vm(ram="2147483648"))),
    # int() refuses more than 4300 digits; this once was a traceback.
    Case("ram-5000-digits", (conf(NEW, 37, f"column 'ram': '{'9' * 55}...' (5000 characters) is too large"
                                           " (expected RAM in MB, e.g. 2048, at most 2147483647)"),),
         add(vm(ram="9" * 5000))),
    Case("disk-fraction", (conf(NEW, 42, "column 'disk': '1.5' is not a positive integer (expected disk size in GB,"
                                         " e.g. 20)"),), add(vm(disk="1.5"))),
    Case("cpus-empty", (conf(NEW, 45, "column 'cpus': '' is not a positive integer (expected a vCPU count, e.g."
                                      " 2)"),), add(vm(cpus=""))),
    # QEMU 7.2's q35 machine (Debian 12) takes at most 288 vCPUs (test_inventory: 288 is accepted).
    Case("cpus-above-q35-limit", (conf(NEW, 45, "column 'cpus': '289' is too large (expected a vCPU count, e.g. 2, at"
                                                " most 288)"),), add(vm(cpus="289"))),
    Case("hostgroups-options-after-a-space",
         (conf(NEW, 47, "column 'hostgroups': 'linux-servers host=kvm1' has an invalid hostgroup 'linux-servers"
                        " host=kvm1' (expected a comma list of names made of letters, digits, '_', '.' and '-',"
                        " starting with a letter or digit, or '-' for none) (fields are separated by tabs; is one"
                        " missing?)"),),
         add(vm(groups="linux-servers host=kvm1", options=None))),
    # Written as prose: the tab hint of the case above misled there (the helper-81 review).
    Case("hostgroups-space-after-comma",
         (conf(NEW, 47, "column 'hostgroups': 'linux-servers, web-servers' has an invalid hostgroup ' web-servers'"
                        " (expected a comma list of names made of letters, digits, '_', '.' and '-', starting with a"
                        " letter or digit, or '-' for none) (a comma list has no spaces around its commas)"),),
         add(vm(groups="linux-servers, web-servers"))),
    Case("hostgroups-twice", (conf(NEW, 47, "column 'hostgroups': 'web-servers,web-servers' names hostgroup"
                                            " 'web-servers' twice (expected each hostgroup once)"),),
         add(vm(groups="web-servers,web-servers"))),
    Case("hostgroups-unknown-to-site",
         (conf(NEW, 61, f"column 'hostgroups': 'nosuch' is not a hostgroup of {{site}} (expected one of: {HOSTGROUPS};"
                        " or add it to [hostgroups])"),
          conf(NEW, 68, f"column 'hostgroups': 'other' is not a hostgroup of {{site}} (expected one of: {HOSTGROUPS};"
                        " or add it to [hostgroups])")),
         add(vm(groups="linux-servers,nosuch,other"))),
    # An empty [hostgroups] still restricts cluster.conf to its (no) groups: say so, not "one of: ;".
    Case("hostgroups-site-lists-none",
         (conf(NEW, 47, "column 'hostgroups': 'web-servers' is not a hostgroup of {site} (expected one of: none listed;"
                        " or add it to [hostgroups])"),),
         lambda text: add(vm(groups="web-servers"))(re.sub(r"\tlinux-servers[a-z,-]*\t", "\t-\t", text)),
         site=lambda text: text[:text.index("[hostgroups]\n") + len("[hostgroups]\n")]),
    # Without [hostgroups], the first line naming a hostgroup declares it: one whose Ansible group would be another
    # group (ansible/inventory.ini would merge them) is refused there.
    Case("hostgroups-ansible-name-of-another-hostgroup",
         (conf(NEW, 61, f"column 'hostgroups': 'web_servers' would be the group 'web_servers' of hostgroup"
                        f" 'web-servers' in ansible/inventory.ini (expected {ANSIBLE_GROUP_RULE})"),),
         add(vm(groups="linux-servers,web_servers")), site=lambda text: text[:text.index("[hostgroups]\n")]),
    Case("hostgroups-ansible-name-of-a-host-group",
         (conf(NEW, 47, f"column 'hostgroups': 'host_kvm1' would be the group 'host_kvm1' of physical host 'kvm1' in"
                        f" ansible/inventory.ini (expected {ANSIBLE_GROUP_RULE})"),),
         add(vm(groups="host_kvm1")), site=lambda text: text[:text.index("[hostgroups]\n")]),
    Case("hostgroups-ansible-own-group",
         (conf(NEW, 47, f"column 'hostgroups': 'all' would be Ansible's own group 'all' in ansible/inventory.ini"
                        f" (expected {ANSIBLE_GROUP_RULE})"),),
         add(vm(groups="all")), site=lambda text: text[:text.index("[hostgroups]\n")]),
    # Two physical hosts whose host_<name> groups are one: a play on host_kvm_2 would reach both hosts' VMs.
    Case("hosts-ansible-name-of-another-host",
         (site(SITE_END + 5, 1, "key 'hosts.kvm_2': would share the group 'host_kvm_2' of ansible/inventory.ini with"
                                " host 'kvm-2' (expected a host name whose group host_<name>, each character other"
                                " than a letter, digit or '_' made '_', is not another host's)"),),
         site=lambda text: text + "".join(f'[hosts.{name}]\nuri = "qemu:///system"\nram_mb = 1024\ncpus = 1\n'
                                          'disk_gb = 10\n' for name in ("kvm-2", "kvm_2"))),
    # ssh/config's `Host localhost localhost.<domain>`, included at the top of the admin's ~/.ssh/config, would
    # take `ssh localhost` to the VM; the hosts fragment and DNS would contradict every machine's /etc/hosts.
    Case("name-localhost",
         (conf(NEW, 1, "column 'name': 'localhost' is a name of every machine's own /etc/hosts (expected another name"
                       " than localhost, ip6-localhost, ip6-loopback, ip6-allnodes, ip6-allrouters: `ssh localhost`"
                       " would reach this VM, and the hosts fragment and DNS would contradict that file)"),),
         add(vm(name="localhost"))),
    # NAME.DOMAIN is one DNS name: at most 253 characters (here 63 + 1 + 193 = 257; 59 + 1 + 193 fits exactly).
    Case("name-and-domain-beyond-253",
         (conf(NEW, 1, f"column 'name': '{'n' * 63}' with domain '{'a' * 55}...' (193 characters) makes a DNS name"
                       " of 257 characters (expected at most 253 in NAME.DOMAIN: a shorter name or domain)"),),
         add(vm(name="n" * 63), vm(name="m" * 59, mac="52:54:00:50:00:98", ip="192.168.50.98")),
         site=sub('domain = "phys.example.org"', f'domain = "{".".join(["a" * 63] * 3)}.b"')),
    # --- the shape of a line -----------------------------------------------------------------------
    Case("spaces-instead-of-tabs", (conf(NEW, 1, f"found 1 tab-separated field ({FIELDS}); fields must be"
                                                 " separated by tabs, not spaces"),),
         add(vm().replace("\t", " "))),
    Case("too-many-fields", (conf(NEW, 1, f"found 9 tab-separated fields ({FIELDS}); options are separated by"
                                          " spaces, not tabs"),), add(vm(options="host=kvm1\tafter=db"))),
    # An invisible tab at the end of a line: said so, at its column (the provision line's tab is at column 104).
    # Likewise a line that is not UTF-8 (a Latin-1 'é' in its options): the VMs after ldap are not told it is missing.
    Case("undecodable-line-still-defines-its-name-for-after",
         (conf(6, 78, "byte 0xe9 is not UTF-8 text (expected a tab-separated UTF-8 text file)"),),
         lambda text: text.encode().replace(b"\t1\tlinux-servers,infrastructure\thost=kvm0 after=provision\nd",
                                            b"\t1\tlinux-servers,infrastructure\th\xe9st=kvm0 after=provision\nd")),
    Case("trailing-tab", (conf(4, 104, f"found 9 tab-separated fields ({FIELDS}); the line ends with a tab after the"
                                       " options: remove it"),),
         lambda text: text.replace("install=cloud\n", "install=cloud\t\n", 1)),
    Case("trailing-tabs-without-options",
         (conf(NEW, 48, f"found 10 tab-separated fields ({FIELDS}); the line ends with tabs after the hostgroups:"
                        " remove them"),),
         add(vm(options=None) + "\t \t\t")),
    Case("whole-file-with-spaces",
         tuple(conf(line, 1, f"found 1 tab-separated field ({FIELDS}); fields must be separated by tabs, not spaces")
               for line in range(4, 12)),
         lambda text: text.replace("\t", "    ")),
    # A line that cannot be split still names its VM for after=: the VMs deployed after ldap are not said to name
    # a VM "not defined above" (one problem, not four); a name no line has is still reported.
    Case("unsplit-line-still-defines-its-name-for-after",
         (conf(6, 1, f"found 1 tab-separated field ({FIELDS}); fields must be separated by tabs, not spaces"),
          option_problem(NEW, 70, f"option 'after': 'nosuch' {AFTER_RULE}")),
         lambda text: add(vm(options="host=kvm1 after=ldap,nosuch"))(
             sub(LDAP_LINE, LDAP_LINE.replace("\t", " "))(text))),
    # --- options -----------------------------------------------------------------------------------
    Case("option-unknown", (option_problem(NEW, 49, f"unknown option 'hots' (expected one of: {OPTION_KEYS})"),),
         add(vm(options="hots=kvm1"))),
    Case("option-without-value", (option_problem(NEW, 59, f"'kvm0' is not a key=value option (expected one of:"
                                                          f" {OPTION_KEYS})"),),
         add(vm(options="host=kvm1 kvm0"))),
    Case("option-twice", (option_problem(NEW, 59, "option 'host' is given twice (expected it once)"),),
         add(vm(options="host=kvm1 host=kvm0"))),
    Case("host-unknown", (option_problem(NEW, 49, "option 'host': 'kvm9' is not a physical host in {site} (expected"
                                                  " one of: auto, kvm0, kvm1)"),), add(vm(options="host=kvm9"))),
    Case("net-unknown", (option_problem(NEW, 59, "option 'net': 'wan' is not a network in {site} (expected one of:"
                                                 " dmz, lan)"),), add(vm(options="host=kvm1 net=wan"))),
    Case("os-unknown", (option_problem(NEW, 59, "option 'os': 'jessie' is not an OS in {site} (expected one of:"
                                                " bookworm)"),), add(vm(options="host=kvm1 os=jessie"))),
    Case("install-unknown", (option_problem(NEW, 59, "option 'install': 'floppy' is not allowed (expected pxe, cloud,"
                                                     " none)"),), add(vm(options="host=kvm1 install=floppy"))),
    Case("install-cloud-without-image",
         (option_problem(4, 91, "install=cloud needs a cloud image, and OS 'bookworm' has none (expected"
                                " 'cloud_image' in [os.bookworm] of {site})"),
          option_problem(9, 83, "install=cloud needs a cloud image, and OS 'bookworm' has none (expected"
                                " 'cloud_image' in [os.bookworm] of {site})")),
         site=sub('cloud_image = "/var/lib/libvirt/images/base/debian-12-genericcloud-amd64.qcow2"\n', "")),
    # kvmconf.disks copies the cloud image only into a qcow2 overlay: these disks would boot empty.
    Case("install-cloud-on-raw-or-lvm",
         (option_problem(NEW, 73, "option 'disk': 'raw' cannot hold install=cloud's image, which only a qcow2 overlay"
                                  " gets (expected disk=qcow2 with install=cloud; raw and LVM disks with install=pxe"
                                  " or none)"),
          option_problem(NEW + 1, 73, "option 'disk': 'lvm:vg0' cannot hold install=cloud's image, which only a qcow2"
                                      " overlay gets (expected disk=qcow2 with install=cloud; raw and LVM disks with"
                                      " install=pxe or none)")),
         add(vm(options="host=kvm1 install=cloud disk=raw"),
             vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98",
                options="host=kvm1 install=cloud disk=lvm:vg0"))),
    # Only Debian's installer reads the generated preseed: an Ubuntu OS is installed from its cloud image.
    Case("install-pxe-of-ubuntu",
         (option_problem(NEW, 59, "install=pxe (the default) needs Debian's installer, and OS 'jammy' is of family"
                                  " 'ubuntu' (expected install=cloud or install=none with it, or an OS of family"
                                  " debian)"),
          option_problem(NEW + 1, 59, "install=pxe needs Debian's installer, and OS 'jammy' is of family 'ubuntu'"
                                      " (expected install=cloud or install=none with it, or an OS of family debian)")),
         add(vm(options="host=kvm1 os=jammy"),
             vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98", options="host=kvm1 install=pxe os=jammy"),
             vm(name="cld", mac="52:54:00:50:00:97", ip="192.168.50.97", options="host=kvm1 install=cloud os=jammy"),
             vm(name="non", mac="52:54:00:50:00:96", ip="192.168.50.96", options="host=kvm1 install=none os=jammy")),
         site=sub("[provision]\n", '[os.jammy]\nfamily = "ubuntu"\nsuite = "jammy"\nkernel = "k"\ninitrd = "i"\n'
                                    'cloud_image = "/var/lib/libvirt/images/base/jammy.img"\n\n[provision]\n')),
    # The provision VM would PXE-boot from the DHCP/TFTP/HTTP server it is to become.
    Case("install-pxe-of-the-provision-vm",
         (option_problem(4, 91, "install=pxe would install the provision VM ([provision] vm in {site}) from itself"
                                " (expected install=cloud, or install=none for a VM installed by other means)"),),
         sub("host=kvm0 install=cloud\n", "host=kvm0 install=pxe\n")),
    Case("install-default-of-the-provision-vm",
         (option_problem(4, 81, "install=pxe (the default) would install the provision VM ([provision] vm in {site})"
                                " from itself (expected install=cloud, or install=none for a VM installed by other"
                                " means)"),),
         sub("host=kvm0 install=cloud\n", "host=kvm0\n")),
    Case("disk-lvm-without-group", (option_problem(NEW, 59, "option 'disk': 'lvm:' is not a disk kind (expected"
                                                            " qcow2, raw or lvm:<volume group>)"),),
         add(vm(options="host=kvm1 disk=lvm:"))),
    Case("disk-unknown-kind", (option_problem(NEW, 59, "option 'disk': 'zfs' is not a disk kind (expected qcow2,"
                                                       " raw or lvm:<volume group>)"),),
         add(vm(options="host=kvm1 disk=zfs"))),
    Case("boot-unknown", (option_problem(NEW, 59, "option 'boot': 'efi' is not allowed (expected bios, uefi)"),),
         add(vm(options="host=kvm1 boot=efi"))),
    Case("autostart-not-yes-no", (option_problem(NEW, 59, "option 'autostart': 'maybe' is not a yes/no value"
                                                          " (expected yes or no; true/false, on/off and 1/0 are"
                                                          " taken too)"),),
         add(vm(options="host=kvm1 autostart=maybe"))),
    Case("keep-zero", (option_problem(NEW, 59, "option 'keep': '0' is not a positive integer (expected a number of"
                                               " restore points, e.g. 4)"),), add(vm(options="host=kvm1 keep=0"))),
    Case("cpuset-not-a-list", (option_problem(NEW, 59, "option 'cpuset': 'a-b' is not a CPU list (expected e.g. 2-5"
                                                       " or 2,3,8-9)"),), add(vm(options="host=kvm1 cpuset=a-b"))),
    Case("cpuset-descending", (option_problem(NEW, 59, "option 'cpuset': '5-2' has a descending range '5-2'"
                                                       " (expected low-high)"),),
         add(vm(options="host=kvm1 cpuset=5-2"))),
    Case("cpuset-cpu-twice", (option_problem(NEW, 59, "option 'cpuset': '1,1' names CPU 1 twice (expected each CPU"
                                                      " once)"),), add(vm(cpus="2", options="host=kvm1 cpuset=1,1"))),
    # range(0, 99999999999) once filled the memory.
    Case("cpuset-huge-range", (option_problem(NEW, 59, "option 'cpuset': '0-99999999999' names CPU '99999999999',"
                                                       " beyond any host (expected CPU numbers 0-8191)"),),
         add(vm(options="host=kvm1 cpuset=0-99999999999"))),
    Case("cpuset-size-not-cpus", (option_problem(NEW, 59, "option 'cpuset': has 2 CPUs but the VM has 1 vCPU"
                                                          " (expected exactly one host CPU per vCPU)"),),
         add(vm(options="host=kvm1 cpuset=0-1"))),
    Case("cpuset-cpu-not-on-host", (option_problem(NEW, 59, "option 'cpuset': CPU 16 does not exist on host 'kvm1'"
                                                            " (expected CPUs 0-15)"),),
         add(vm(options="host=kvm1 cpuset=16"))),
    Case("cpuset-shared-with-another-vm",
         (option_problem(NEW, 59, "option 'cpuset': CPU 7 of host 'kvm1' is already pinned to 'compute1' (expected"
                                  " CPUs no other VM on the host uses)"),),
         add(vm(cpus="2", options="host=kvm1 cpuset=7-8"))),
    Case("cpuset-shared-and-missing-cpus",
         (option_problem(NEW, 59, "option 'cpuset': CPUs 16, 17 do not exist on host 'kvm1' (expected CPUs 0-15)"),
          option_problem(NEW, 59, "option 'cpuset': CPUs 4, 5 of host 'kvm1' are already pinned to 'compute1'"
                                  " (expected CPUs no other VM on the host uses)"),
          option_problem(NEW + 1, 59, "option 'cpuset': CPU 9 of host 'kvm1' is already pinned to 'new' (expected CPUs"
                                      " no other VM on the host uses)")),
         add(vm(cpus="6", options="host=kvm1 cpuset=4-5,8-9,16-17"),
             vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98", cpus="2", options="host=kvm1 cpuset=9-10"))),
    Case("cpuset-without-host", (option_problem(NEW, 49, "option 'cpuset': pins CPUs of no particular host (expected"
                                                         " host=<name> with it; host=auto chose 'kvm0')"),),
         add(vm(options="cpuset=0"))),
    # --- extra NICs, housekeeping CPUs, NUMA (kvm1 gets the devices of DEVICES) -------------------------
    Case("nic-not-a-nic", (option_problem(NEW, 59, f"option 'nic': 'tap:x' is not a NIC (expected {NIC_GRAMMAR})"),),
         add(vm(options="host=kvm1 nic=tap:x")), site=devices),
    Case("nic-macvtap-mode", (option_problem(NEW, 59, "option 'nic': 'macvtap:eno1:bridged' has macvtap mode"
                                                      " 'bridged' (expected one of: bridge, vepa, private,"
                                                      " passthrough)"),),
         add(vm(options="host=kvm1 nic=macvtap:eno1:bridged")), site=devices),
    Case("nic-unknown-host-interface",
         (option_problem(NEW, 59, "option 'nic': 'eno9' is not an interface of host 'kvm1' (expected one of: eno1,"
                                  " eno2 from [hosts.kvm1] interfaces in {site})"),),
         add(vm(options="host=kvm1 nic=macvtap:eno9")), site=devices),
    Case("nic-unknown-interface-mac",
         (option_problem(NEW, 59, "option 'nic': 'aa:bb:cc:dd:ee:01' is no interface of host 'kvm1' (expected one"
                                  " of: eno1, eno2 from [hosts.kvm1] interfaces in {site})"),),
         add(vm(options="host=kvm1 nic=macvtap:aa:bb:cc:dd:ee:01:vepa")), site=devices),
    # What the kernel refuses when the VM starts (`ip link add link IF type macvtap mode ...` on a veth): a
    # passthrough macvtap beside any other macvtap on its interface (EINVAL), a macvtap on a bridge port (EBUSY).
    Case("nic-macvtap-beside-passthrough",
         (option_problem(NEW, 88, "option 'nic': interface 'eno2' of host 'kvm1' is taken whole by the macvtap"
                                  " passthrough NIC of 'new' (expected no other macvtap NIC on an interface in"
                                  " passthrough mode)"),),
         add(vm(options="host=kvm1 nic=macvtap:eno2:passthrough nic=macvtap:eno2")), site=devices),
    Case("nic-macvtap-passthrough-after-another-vm",
         (option_problem(NEW + 1, 60, "option 'nic': macvtap passthrough takes interface 'eno2' of host 'kvm1' whole,"
                                      " and 'new' has a macvtap NIC on it already (expected no other macvtap NIC on"
                                      " an interface in passthrough mode)"),),
         add(vm(options="host=kvm1 nic=macvtap:eno2:vepa"),
             vm(name="new2", mac="52:54:00:50:00:98", ip="192.168.50.98",
                options="host=kvm1 nic=macvtap:eno2:passthrough")),
         site=devices),
    Case("nic-macvtap-on-the-uplink",
         (option_problem(NEW, 59, "option 'nic': interface 'eno1' of host 'kvm1' is a port of bridge 'br0' (network"
                                  " 'lan'; fab kvm-setup puts it there, from [hosts.kvm1] uplink), and the kernel"
                                  " puts no macvtap on a bridge port (expected another interface, or"
                                  " nic=bridge:lan)"),),
         add(vm(options="host=kvm1 nic=macvtap:eno1")),
         site=lambda text: sub("[hosts.kvm1]\n", '[hosts.kvm1]\nuplink = "eno1"\n')(devices(text))),
    # A tagged network's bridge sits on <uplink>.<vlan>: that VLAN interface is a bridge port too.
    Case("nic-macvtap-on-the-uplinks-vlan-interface",
         (option_problem(NEW, 59, "option 'nic': interface 'eno1.60' of host 'kvm1' is a port of bridge 'br60'"
                                  " (network 'dmz'; fab kvm-setup puts it there, from [hosts.kvm1] uplink), and the"
                                  " kernel puts no macvtap on a bridge port (expected another interface, or"
                                  " nic=bridge:dmz)"),),
         add(vm(options="host=kvm1 nic=macvtap:eno1.60")),
         site=lambda text: sub("[hosts.kvm1]\n", '[hosts.kvm1]\nuplink = "eno1"\ninterfaces = ["eno1.60"]\n')(text)),
    Case("nic-unknown-network", (option_problem(NEW, 59, "option 'nic': 'wan' is not a network in {site} (expected"
                                                         " one of: dmz, lan)"),),
         add(vm(options="host=kvm1 nic=bridge:wan"))),
    # Whichever host the VM gets, its bridge NIC needs a network of site.toml: said beside an unknown host=.
    Case("nic-unknown-network-and-host",
         (option_problem(NEW, 49, "option 'host': 'kvm9' is not a physical host in {site} (expected one of: auto,"
                                  " kvm0, kvm1)"),
          option_problem(NEW, 59, "option 'nic': 'wan' is not a network in {site} (expected one of: dmz, lan)")),
         add(vm(options="host=kvm9 nic=bridge:wan"))),
    Case("nic-pci-not-on-host",
         (option_problem(NEW, 59, "option 'nic': '0000:1a:00.2' is not a PCI function of host 'kvm1' (expected one"
                                  " of: 0000:1a:00.1 from [hosts.kvm1] pci in {site})"),),
         add(vm(options="host=kvm1 nic=pci:0000:1a:00.2")), site=devices),
    Case("nic-duplicate-pci-function",
         (option_problem(NEW + 1, 59, "option 'nic': PCI function 0000:1a:00.1 of host 'kvm1' is already given to"
                                      " 'new' (expected each PCI function on one VM only)"),),
         add(vm(options="host=kvm1 nic=pci:0000:1a:00.1"),
             vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98", options="host=kvm1 nic=pci:0000:1A:00.1")),
         site=devices),
    Case("nic-too-many-vfs",
         (option_problem(NEW, 83, "option 'nic': eno2 of host 'kvm1' has 2 VFs and the VMs up to this line use 3"
                                  " (expected at most 2; see [hosts.kvm1] sriov)"),),
         add(vm(options="host=kvm1 nic=vf:eno2 nic=vf:eno2 nic=vf:eno2")), site=devices),
    Case("nic-vf-index-beyond-count",
         (option_problem(NEW, 59, "option 'nic': eno2 of host 'kvm1' has no VF 5 (expected 0-1)"),),
         add(vm(options="host=kvm1 nic=vf:eno2:5")), site=devices),
    Case("nic-vf-pinned-without-addresses",
         (option_problem(NEW, 59, "option 'nic': pins VF 1 of eno2, whose VF addresses {site} does not list"
                                  " (expected [hosts.kvm1] sriov = {eno2 = [\"dddd:bb:ss.f\", ...]}, or vf:eno2"
                                  " without an index)"),),
         add(vm(options="host=kvm1 nic=vf:eno2:1")), site=devices),
    Case("nic-not-a-pf", (option_problem(NEW, 59, "option 'nic': 'eno1' is not an SR-IOV physical function of"
                                                  " host 'kvm1' (expected one of: eno2 from [hosts.kvm1] sriov in"
                                                  " {site})"),),
         add(vm(options="host=kvm1 nic=vf:eno1")), site=devices),
    Case("nic-mac-taken", (option_problem(NEW, 59, "option 'nic': MAC 52:54:00:50:00:02 is already used by"
                                                   " 'provision' (expected unique MAC addresses; give this NIC one"
                                                   " with /<mac>)"),),
         add(vm(options="host=kvm1 nic=bridge:dmz/52:54:00:50:00:02"))),
    Case("cpuset-on-housekeeping-cpu",
         (option_problem(NEW, 59, "option 'cpuset': CPU 1 of host 'kvm1' is reserved for housekeeping (expected CPUs"
                                  " outside [hosts.kvm1] housekeeping_cpus)"),),
         add(vm(options="host=kvm1 cpuset=1")), site=devices),
    Case("host-not-a-name",
         (option_problem(NEW, 49, "option 'host': '-kvm' is not a name (expected letters, digits, '_', '.' and '-',"
                                  " starting with a letter or digit)"),),
         add(vm(options="host=-kvm"))),
    Case("numa-node-missing", (option_problem(NEW, 59, "option 'numa': host 'kvm1' has no NUMA node 1 (expected 0-0;"
                                                       " see [hosts.kvm1] numa_nodes)"),),
         add(vm(options="host=kvm1 numa=1"))),
    Case("site-sriov-not-a-count",
         (site(60, 1, "key 'hosts.kvm1.sriov': eno2 = 0 is not a VF count (expected a number of VFs 1-256, or the"
                      " list of the VFs' PCI addresses)"),),
         site=sub("[hosts.kvm1]\n", "[hosts.kvm1]\nsriov = {eno2 = 0}\n")),
    Case("site-sriov-not-an-interface",
         (site(60, 1, "key 'hosts.kvm1.sriov': 'eno/2' is not an interface name (expected at most 15 letters, digits,"
                      " '-', '_', '.')"),),
         site=sub("[hosts.kvm1]\n", '[hosts.kvm1]\nsriov = {"eno/2" = 2}\n')),
    Case("site-pci-not-an-address",
         (site(60, 1, "key 'hosts.kvm1.pci': '1a:00.1' is not a PCI address (expected dddd:bb:ss.f, e.g."
                      " 0000:1a:00.1)"),),
         site=sub("[hosts.kvm1]\n", '[hosts.kvm1]\npci = ["1a:00.1"]\n')),
    Case("site-housekeeping-beyond-host",
         (site(60, 1, "key 'hosts.kvm1.housekeeping_cpus': '14-16' names CPUs the host does not have (expected"
                      " CPUs 0-15)"),),
         site=sub("[hosts.kvm1]\n", '[hosts.kvm1]\nhousekeeping_cpus = "14-16"\n')),
    Case("site-interface-bad-mac",
         (site(60, 1, "key 'hosts.kvm1.interfaces': 'eno1' = 'zz' is not an interface (expected a name of at most"
                      " 15 letters, digits, '-', '_', '.', and optionally its MAC xx:xx:xx:xx:xx:xx)"),),
         site=sub("[hosts.kvm1]\n", '[hosts.kvm1]\ninterfaces = {eno1 = "zz"}\n')),
    Case("nic-vf-pinned-twice",
         (option_problem(NEW + 1, 59, "option 'nic': VF 1 of eno2 (0000:3b:02.1) on host 'kvm1' is already given"
                                      " to 'new' (expected each PCI function on one VM only)"),),
         add(vm(options="host=kvm1 nic=vf:eno2:1"),
             vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98", options="host=kvm1 nic=vf:eno2:1")),
         site=sub("[hosts.kvm1]\n", '[hosts.kvm1]\nsriov = {eno2 = ["0000:3b:02.0", "0000:3b:02.1"]}\n')),
    Case("nic-macvtap-on-auto-placed-vm",
         (option_problem(NEW, 49, "option 'nic': 'eno1' is not an interface of host 'kvm0' (expected one of: none"
                                  " listed from [hosts.kvm0] interfaces in {site}; host=auto chose 'kvm0')"),),
         add(vm(options="nic=macvtap:eno1")), site=devices),
    Case("after-unknown", (option_problem(NEW, 70, f"option 'after': 'nosuch' {AFTER_RULE}"),),
         add(vm(options="host=kvm1 after=ldap,nosuch"))),
    Case("after-later-vm", (option_problem(NEW, 65, f"option 'after': 'later' {AFTER_RULE}"),),
         add(vm(options="host=kvm1 after=later"), vm(name="later", mac="52:54:00:50:00:98", ip="192.168.50.98"))),
    Case("after-itself", (option_problem(NEW, 65, f"option 'after': 'new' {AFTER_RULE}"),),
         add(vm(options="host=kvm1 after=new"))),
    Case("after-empty-name", (option_problem(NEW, 59, "option 'after': 'ldap,,db' has '', which is not a VM name"
                                                      " (expected a comma list of VM names)"),),
         add(vm(options="host=kvm1 after=ldap,,db"))),
    # --- across lines --------------------------------------------------------------------------------
    Case("name-duplicate", (conf(NEW, 1, "column 'name': 'db' is already used on line 7 (expected unique names)"),),
         add(vm(name="db"))),
    Case("mac-duplicate-other-case",
         (conf(NEW + 1, 5, "column 'mac': '52:54:00:ab:00:01' is already used on line 12 (expected unique MAC"
                           " addresses)"),),
         add(vm(mac="52:54:00:ab:00:01"), vm(name="nxt", mac="52:54:00:AB:00:01", ip="192.168.50.98"))),
    Case("ip-duplicate", (conf(NEW, 23, "column 'ip': '192.168.50.21' is already used on line 8 (expected unique IP"
                                        " addresses)"),), add(vm(ip="192.168.50.21"))),
    Case("ip-outside-network", (conf(NEW, 23, "column 'ip': '10.0.0.5' is outside network 'lan' (192.168.50.0/24)"
                                              " (expected an address in 192.168.50.0/24, or net=<network>)"),),
         add(vm(ip="10.0.0.5"))),
    Case("ip-outside-its-net", (conf(NEW, 23, "column 'ip': '192.168.50.99' is outside network 'dmz'"
                                              " (192.168.60.0/24) (expected an address in 192.168.60.0/24)"),),
         add(vm(options="host=kvm1 net=dmz"))),
    Case("ip-network-address", (conf(NEW, 23, "column 'ip': '192.168.50.0' is the network address of network 'lan'"
                                              " (expected a host address of its own)"),), add(vm(ip="192.168.50.0"))),
    Case("ip-broadcast", (conf(NEW, 23, "column 'ip': '192.168.50.255' is the broadcast address of network 'lan'"
                                        " (expected a host address of its own)"),), add(vm(ip="192.168.50.255"))),
    Case("ip-gateway", (conf(NEW, 23, "column 'ip': '192.168.50.1' is the gateway of network 'lan' (expected a host"
                                      " address of its own)"),), add(vm(ip="192.168.50.1"))),
    Case("ip-in-dhcp-range", (conf(NEW, 23, "column 'ip': '192.168.50.200' is inside the dynamic DHCP range"
                                            " 192.168.50.200-192.168.50.250 of network 'lan' (expected an address"
                                            " outside it)"),), add(vm(ip="192.168.50.200"))),
    Case("ip-provision-server", (conf(NEW, 23, "column 'ip': '192.168.50.5' is the provision server's address"
                                               " ([provision] server in {site}) (expected a host address of its"
                                               " own)"),),
         add(vm(ip="192.168.50.5")), sub('vm = "provision"', 'server = "192.168.50.5"')),
    Case("ip-of-the-provision-vm", (conf(NEW, 23, "column 'ip': '192.168.50.2' is already used on line 4 (expected"
                                                  " unique IP addresses)"),), add(vm(ip="192.168.50.2"))),
    # A physical host with an IP address is NAME and NAME.<domain> in the cluster's DNS: no VM may take either.
    Case("ip-of-a-physical-host", (conf(NEW, 23, "column 'ip': '192.168.50.4' is the address of physical host 'kvm0'"
                                                 f" ([hosts.kvm0] address at {{site}}:{KVM0_ADDRESS_LINE}:1) (expected"
                                                 " a host address of its own)"),), add(vm(ip="192.168.50.4"))),
    Case("name-of-a-physical-host", (conf(NEW, 1, "column 'name': 'kvm0' is also the name of physical host 'kvm0'"
                                                  f" ([hosts.kvm0] at {{site}}:{KVM0_LINE}:1) (expected a name of its"
                                                  " own: DNS names ignore case, and a host with an IP address is"
                                                  " kvm0.phys.example.org in the cluster's DNS)"),),
         add(vm(name="kvm0"))),
    Case("name-of-a-physical-host-in-capitals",
         (conf(NEW, 1, "column 'name': 'nas' is also the name of physical host 'NAS' ([hosts.NAS] at"
                       f" {{site}}:{SITE_END}:1) (expected a name of its own: DNS names ignore case, and a host with"
                       " an IP address is nas.phys.example.org in the cluster's DNS)"),),
         add(vm(name="nas")), add("[hosts.NAS]", 'uri = "qemu:///system"', "ram_mb = 1024", "cpus = 1", "disk_gb = 1")),
    Case("capacity-ram-second-vm-pushes-over",
         (conf(NEW + 1, 37, "column 'ram': 10000 puts host 'kvm1' over capacity: its VMs up to this line need 66384 MB"
                            " RAM (expected at most 65536 = 65536 × overcommit 1)"),),
         add(vm(ram="40000"), vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98", ram="10000"))),
    Case("capacity-cpus-with-overcommit",
         (conf(NEW, 45, "column 'cpus': 29 puts host 'kvm1' over capacity: its VMs up to this line need 33 vCPUs"
                        " (expected at most 32 = 16 × overcommit 2)"),), add(vm(cpus="29"))),
    Case("capacity-disk", (conf(NEW, 42, "column 'disk': 1901 puts host 'kvm1' over capacity: its VMs up to this line"
                                         " need 2001 GB disk (expected at most 2000 = 2000 × overcommit 1)"),),
         add(vm(disk="1901"))),
    Case("capacity-names-auto-placed-vms",
         (conf(NEW + 1, 37, "column 'ram': 20000 puts host 'kvm0' over capacity: its VMs up to this line need 140480"
                            " MB RAM (expected at most 131072 = 131072 × overcommit 1; host=auto put login, scratch,"
                            " new there: pin one elsewhere with host=<name>)"),),
         add(vm(ram="100000", options=""), vm(name="nxt", mac="52:54:00:50:00:98", ip="192.168.50.98", ram="20000",
                                              options="host=kvm0"))),
    Case("auto-placement-fits-nowhere",
         (conf(NEW, 1, "column 'name': 'new' fits on no physical host: needs 200000 MB RAM, 1 vCPU and 10 GB disk,"
                       " more than any host has left (expected a host in {site} with that much free capacity after"
                       " the VMs above, or host=<name>)"),),
         add(vm(ram="200000", options=None))),
    # --- several problems on one line: each is reported ------------------------------------------------
    Case("duplicate-name-and-malformed-ip",
         (conf(NEW, 1, "column 'name': 'db' is already used on line 7 (expected unique names)"),
          conf(NEW, 22, "column 'ip': '192.168.50.999' is not an IPv4 address (expected a.b.c.d)")),
         add(vm(name="db", ip="192.168.50.999"))),
    Case("duplicate-name-and-ip-in-dhcp-range",
         (conf(NEW, 1, "column 'name': 'db' is already used on line 7 (expected unique names)"),
          conf(NEW, 22, "column 'ip': '192.168.50.210' is inside the dynamic DHCP range 192.168.50.200-192.168.50.250"
                        " of network 'lan' (expected an address outside it)")),
         add(vm(name="db", ip="192.168.50.210"))),
    Case("duplicate-name-bad-mac-unknown-host",
         (conf(NEW, 1, "column 'name': 'db' is already used on line 7 (expected unique names)"),
          conf(NEW, 4, "column 'mac': 'zz' is not a MAC address (expected xx:xx:xx:xx:xx:xx)"),
          option_problem(NEW, 33, "option 'host': 'kvm9' is not a physical host in {site} (expected one of: auto,"
                                  " kvm0, kvm1)")),
         add(vm(name="db", mac="zz", options="host=kvm9"))),
    Case("many-lines-sorted",
         (conf(NEW, 23, "column 'ip': '192.168.50.1' is the gateway of network 'lan' (expected a host address of its"
                        " own)"),
          conf(NEW, 48, f"column 'options': unknown option 'color' (expected one of: {OPTION_KEYS})"),
          conf(NEW + 1, 1, "column 'name': 'new' is already used on line 12 (expected unique names)"),
          conf(NEW + 1, 5, "column 'mac': '52:54:00:50:00:99' is already used on line 12 (expected unique MAC"
                           " addresses)"),
          conf(NEW + 1, 37, "column 'ram': 'lots' is not a positive integer (expected RAM in MB, e.g. 2048)"),
          conf(NEW + 3, 1, f"found 2 tab-separated fields ({FIELDS}); fields must be separated by tabs, not spaces")),
         add(vm(ip="192.168.50.1", options="color=blue"), vm(ram="lots", ip="192.168.50.98"), "# fine",
             "x\ty z")),
    # --- files that are not text -------------------------------------------------------------------------
    Case("nul-byte", (conf(NEW, 4, "contains a NUL byte: this is not a text file (expected tab-separated UTF-8"
                                   " text)"),),
         lambda text: text.encode() + b"new\0junk\n"),
    Case("binary-junk", (conf(1, 1, "contains a NUL byte: this is not a text file (expected tab-separated UTF-8"
                                    " text)"),), lambda text: bytes(range(256)) * 64),
    Case("latin-1", (conf(NEW, 2, "byte 0xe9 is not UTF-8 text (expected a tab-separated UTF-8 text file)"),),
         lambda text: text.encode() + vm(name="n\xe9w").encode("latin-1") + b"\n"),
    Case("bad-utf8-column-counts-characters",
         (conf(NEW, 3, "byte 0xff is not UTF-8 text (expected a tab-separated UTF-8 text file)"),),
         lambda text: text.encode() + "ñé".encode() + b"\xff\n"),
    Case("empty-file", (conf(1, 1, "no VMs defined (expected one tab-separated line per VM: name mac ip ram disk cpus"
                                   " hostgroups [options])"),), lambda text: ""),
    Case("comments-only", (conf(1, 1, "no VMs defined (expected one tab-separated line per VM: name mac ip ram disk"
                                      " cpus hostgroups [options])"),), lambda text: "# nothing yet\n\n   \n"),
    Case("one-megabyte-line", (conf(NEW, 1, f"column 'name': '{'a' * 55}...' (1000000 characters) {NAME_RULE}"),),
         add(vm(name="a" * 1_000_000))),
    Case("crlf-line-endings", (option_problem(NEW, 49, "option 'host': 'kvm9' is not a physical host in {site}"
                                                       " (expected one of: auto, kvm0, kvm1)"),),
         lambda text: (text + vm(options="host=kvm9") + "\n").replace("\n", "\r\n")),
    # Lines ended by CR alone (classic Mac; some spreadsheets still save tab-separated text so) made the file one
    # comment line: "no VMs defined". Said as what it is, at the first CR.
    Case("classic-mac-line-endings",
         (conf(1, FIRST_LINE_END, "holds a carriage return (CR) inside the line (expected lines ending in LF or CR LF:"
                                  " save the file as Unix or Windows text)"),),
         lambda text: text.replace("\n", "\r")),
    Case("carriage-return-inside-a-line",
         (conf(NEW, 58, "holds a carriage return (CR) inside the line (expected lines ending in LF or CR LF: save the"
                        " file as Unix or Windows text)"),),
         add(vm(options="host=kvm1\rafter=db"))),
    # --- site.toml -----------------------------------------------------------------------------------------
    Case("site-not-toml", (site(89, 8, "not valid TOML: Invalid value"),), site=sub("keep = 2", "keep = = 2")),
    Case("site-unclosed-table", (site(102, 3, "not valid TOML: Expected ']' at the end of a table declaration"),),
         site=lambda text: text + "[x\n"),
    Case("site-unknown-top-key",
         (site(8, 1, "key 'timzone': unknown key (expected one of: accounts, backup, default_network, default_os,"
                     " domain, domain_type, hostgroups, hosts, keyboard, locale, networks, os, provision,"
                     " timezone)"),),
         site=sub('default_network = "lan"', 'timzone = "UTC"\ndefault_network = "lan"')),
    Case("site-unknown-host-key",
         (site(39, 3, "key 'hosts.kvm0.ram': unknown key (expected one of: address, cpu_overcommit, cpus, disk_dir,"
                      " disk_gb, disk_overcommit, housekeeping_cpus, interfaces, nested, network_stack, numa_nodes,"
                      " pci, ram_mb, ram_overcommit, sriov, uplink, uri)"),),
         site=sub("[hosts.kvm0]\n", "[hosts.kvm0]\n  ram = 1\n")),
    Case("site-wrong-type", (site(40, 1, "key 'hosts.kvm0.ram_mb': 'lots' is a string (expected a positive"
                                         " integer)"),), site=sub("ram_mb = 131072", 'ram_mb = "lots"')),
    Case("site-nan-overcommit", (site(45, 1, "key 'hosts.kvm0.cpu_overcommit': nan is out of range (expected a"
                                             " positive number)"),),
         site=sub("cpu_overcommit = 4.0", "cpu_overcommit = nan")),
    Case("site-subnet-host-bits", (site(22, 1, "key 'networks.lan.subnet': '192.168.50.1/24' is not an IPv4 network"
                                               " (host bits are set; expected 192.168.50.0/24)"),),
         site=sub('subnet = "192.168.50.0/24"', 'subnet = "192.168.50.1/24"')),
    Case("site-dhcp-range-not-a-string",
         (site(26, 1, "key 'networks.lan.dhcp_ranges': [1] is not a list of DHCP ranges (expected strings"
                      ' "FIRST-LAST" such as "192.168.1.200-192.168.1.250")'),),
         site=sub('dhcp_ranges = ["192.168.50.200-192.168.50.250"]', "dhcp_ranges = [1]")),
    Case("site-provision-vm-unknown",
         (site(75, 1, "key 'provision.vm': 'nosuch' is not a VM of {conf} (expected the name of the VM that is the"
                      " provision server)"),),
         site=sub('vm = "provision"', 'vm = "nosuch"')),
    # dnsmasq never forwards to its own address: a provision VM whose network hands out only itself as name server
    # (its /etc/resolv.conf, written by cloud-init) needs upstream_dns, or no VM resolves deb.debian.org.
    Case("site-upstream-dns-missing",
         (site(74, 1, "table '[provision]' needs key 'upstream_dns': the provision VM 'provision' has no name server"
                      " but itself (192.168.50.2: network 'lan' hands out no other), to which its dnsmasq never"
                      " forwards, so no VM could resolve a name outside phys.example.org (expected upstream_dns ="
                      " [\"a.b.c.d\", ...]: the name servers the provision server's dnsmasq forwards names outside"
                      " the cluster to, or [] for none)"),),
         site=sub('upstream_dns = ["192.168.50.1"]', "")),
    Case("site-upstream-dns-is-the-provision-vm",
         (site(84, 1, "key 'provision.upstream_dns': '192.168.50.2' is the provision server's own address (the IP of"
                      " the provision VM 'provision' in {conf}), to which dnsmasq never forwards (expected the name"
                      " servers it forwards names outside phys.example.org to, other than itself)"),),
         site=sub('upstream_dns = ["192.168.50.1"]', 'upstream_dns = ["192.168.50.1", "192.168.50.2"]')),
    Case("site-upstream-dns-is-the-provision-server",
         (site(84, 1, "key 'provision.upstream_dns': '192.168.50.4' is the provision server's own address ([provision]"
                      " server), to which dnsmasq never forwards (expected the name servers it forwards names outside"
                      " phys.example.org to, other than itself)"),),
         site=lambda text: sub('upstream_dns = ["192.168.50.1"]', 'upstream_dns = ["192.168.50.4"]')(
             sub('vm = "provision"', 'server = "192.168.50.4"')(text))),
    Case("site-schedule-with-names",
         (site(86, 1, "key 'backup.schedule': '30 2 * * mon' is not a cron schedule kvmconf reads (expected numbers,"
                      " *, ranges, lists and steps, e.g. '30 2 * * 1-5', within minute 0-59, hour 0-23, day 1-31,"
                      " month 1-12, weekday 0-7; no names such as mon)"),),
         site=sub('schedule = "30 2 * * *"', 'schedule = "30 2 * * mon"')),
    Case("site-schedule-out-of-range",
         (site(86, 1, "key 'backup.schedule': '70 25 * * *' is not a cron schedule kvmconf reads (expected numbers,"
                      " *, ranges, lists and steps, e.g. '30 2 * * 1-5', within minute 0-59, hour 0-23, day 1-31,"
                      " month 1-12, weekday 0-7; no names such as mon)"),),
         site=sub('schedule = "30 2 * * *"', 'schedule = "70 25 * * *"')),
    Case("site-schedule-never-runs",
         (site(86, 1, "key 'backup.schedule': '0 0 31 2 *' runs at most once in two years (a day that never comes,"
                      " such as February 31st?): expected a schedule that runs at least yearly, e.g. '30 2 * * *'"),),
         site=sub('schedule = "30 2 * * *"', 'schedule = "0 0 31 2 *"')),
    Case("site-verify-schedule-with-names",
         (site(94, 1, "key 'backup.verify_schedule': '30 4 * * sun' is not a cron schedule kvmconf reads (expected"
                      " numbers, *, ranges, lists and steps, e.g. '30 2 * * 1-5', within minute 0-59, hour 0-23, day"
                      " 1-31, month 1-12, weekday 0-7; no names such as mon)"),),
         site=sub('verify_schedule = "30 4 * * 0"', 'verify_schedule = "30 4 * * sun"')),
    Case("site-provision-table-missing", (site(1, 1, "table '[provision]' is missing"),),
         site=lambda text: text[:text.index("[provision]")] + text[text.index("[backup]"):]),
    Case("site-secrets-is-a-directory",
         (site(18, 1, "key 'accounts.secrets': is a directory, not a TOML file (expected a TOML file with an"
                      " [accounts] table, or no file)"),),
         files={"secrets.toml": None}),
    Case("site-secrets-bad-values",
         (("secrets.toml", 2, 1, "key 'accounts.root_password_hash': is not a crypt(3) hash (expected a SHA-512"
                                 " '$6$...' or yescrypt '$y$...' hash, e.g. from mkpasswd -m sha-512, or '!' for a"
                                 " locked account; plain text is refused)"),
          ("secrets.toml", 3, 1, "key 'accounts.pasword': unknown key (expected one of: admin_password_hash,"
                                 " root_password_hash, ssh_keys)")),
         files={"secrets.toml": '[accounts]\nroot_password_hash = "hunter2"\npasword = 1\n'}),
    # A broken site.toml stops the checks against it, not those within cluster.conf.
    Case("site-both-files-sorted",
         (conf(NEW, 1, "column 'name': 'Web' " + NAME_RULE),
          conf(NEW + 1, 1, "column 'name': 'db' is already used on line 7 (expected unique names)"),
          site(3, 1, "key 'domain': 'Phys_Example' is not a DNS domain (expected lowercase labels separated by"
                     " dots)"),
          site(89, 1, "key 'backup.keep': 0 is out of range (expected a positive integer)")),
         add(vm(name="Web"), vm(name="db", mac="52:54:00:50:00:98", ip="192.168.50.98")),
         lambda text: sub("keep = 2", "keep = 0")(sub('domain = "phys.example.org"', 'domain = "Phys_Example"')(text))),
    Case("site-not-utf8", (site(3, 13, "byte 0xe9 is not UTF-8 (expected a UTF-8 TOML file)"),),
         site=lambda text: text.encode().replace(b"phys.example.org", b"ph\xe9s.example.org")),
    Case("site-integer-too-long", (site(40, 10, "not valid TOML: an integer is too long"),),
         site=sub("ram_mb = 131072", "ram_mb = " + "9" * 5000)),
]


def _materialise(case: Case, tmp_path: Path) -> tuple[Path, Path]:
    conf_path, site_path = tmp_path / "cluster.conf", tmp_path / "site.toml"
    for path, content in ((conf_path, case.conf(EXAMPLE_CONF)), (site_path, case.site(EXAMPLE_SITE))):
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for name, extra in case.files.items():
        if extra is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(extra if isinstance(extra, bytes) else extra.encode())
    return conf_path, site_path


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    conf_path, site_path = _materialise(case, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_cluster(conf_path, site_path)
    found = [(Path(p.location.path).name, p.location.line, p.location.col, p.message) for p in caught.value.problems]
    assert [where[:3] for where in found] == [expected[:3] for expected in case.expected], found
    for (_, _, _, message), (_, _, _, expected) in zip(found, case.expected, strict=True):
        if isinstance(expected, Re):
            assert re.fullmatch(expected.pattern, message), message
        else:
            assert message == expected.replace("{site}", str(site_path)).replace("{conf}", str(conf_path))
    # Each line of the error names its file and position, as an editor's quickfix list expects.
    for line in str(caught.value).splitlines():
        assert re.match(rf"{re.escape(str(tmp_path))}/[a-z.]+:\d+:\d+: ", line), line


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("expected", [
    (),
    (("cluster.conf", 1, 1, ""),),
    (("cluster.conf", 1, 1, Re(" ")),),
])
def test_a_case_without_an_expected_message_is_refused(expected: tuple[Expected, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected problem|needs a file, line, column and message"):
        Case("incomplete", expected)


def test_the_example_itself_is_valid(tmp_path: Path) -> None:
    """The baseline every case changes: without a change, it has no problem at all."""
    conf_path, site_path = _materialise(Case("none", (conf(1, 1, "unused"),)), tmp_path)
    assert len(load_cluster(conf_path, site_path).vms) == NEW - 4
