"""The cluster.conf contract as data: one table of columns and one of options.

The parser, the README's column tables (``python -m generators --doc``) and every error
message are derived from these two tables, so they cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from typing import Any

from generators.errors import shown
from generators.model import Boot, DiskKind, Install, Nic, NicKind


class FieldError(ValueError):
    """A single value is malformed; the message completes "'VALUE' ..." and names what is allowed."""


LABEL = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")  # a VM name: an RFC 1123 label; also host_records
MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")  # lower case; also used by site.py
# Hostgroups, and what host=, net= and os= take; also site.toml's [hostgroups], [hosts.*], [networks.*] and
# [os.*] names, which they name. NAME_RULE says it in messages.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit"
_VOLUME_GROUP = re.compile(r"[A-Za-z0-9_.+][A-Za-z0-9_.+-]*")
_CPU_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
# The parser's bound for RAM, disk and keep=: large enough for any real VM (2 PB of RAM), small enough
# that sums stay exact in floats. It is no promise that every consumer takes such a value (qemu-img
# refuses a disk of 2**31-1 GB); the hosts' capacity in site.toml is what bounds real VMs.
MAX_INT = 2**31 - 1
# vCPUs of one VM: QEMU's q35 machine (the domain XML's) takes at most 288 up to QEMU 7.2, Debian 12's
# (`virsh domcapabilities --machine q35` says <vcpu max='288'/>); QEMU 8.0 raised it to 1024 and 9.0
# to 4096. libvirt's schema refuses anything above 65535.
MAX_VCPUS = 288
# Linux's largest NR_CPUS; bounds the expansion of ranges like 0-99999999.
MAX_CPU = 8191


def parse_name(text: str) -> str:
    if not LABEL.fullmatch(text):
        raise FieldError(
            "is not a valid VM name (expected an RFC 1123 label: lowercase letters, digits and '-',"
            " starting with a letter, not ending with '-', at most 63 characters)"
        )
    return text


def parse_mac(text: str) -> str:
    mac = text.lower()
    if not MAC_PATTERN.fullmatch(mac):
        raise FieldError("is not a MAC address (expected xx:xx:xx:xx:xx:xx)")
    if int(mac[:2], 16) & 1:
        raise FieldError("is a multicast MAC address (expected a unicast MAC, e.g. 52:54:00:xx:xx:xx)")
    if mac == "00:00:00:00:00:00":
        raise FieldError("is the all-zero MAC address (expected a unicast MAC, e.g. 52:54:00:xx:xx:xx)")
    return mac


def parse_ipv4(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise FieldError("is not an IPv4 address (expected a.b.c.d)") from None


def parse_positive(text: str, expected: str = "e.g. 1, 2048", maximum: int = MAX_INT) -> int:
    digits = text.lstrip("0")
    if not text.isascii() or not text.isdigit() or not digits:
        raise FieldError(f"is not a positive integer (expected {expected})")
    # Length first: int() refuses more than 4300 digits with a ValueError of its own.
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise FieldError(f"is too large (expected {expected}, at most {maximum})")
    return int(digits)


def positive_parser(expected: str, maximum: int = MAX_INT) -> Callable[[str], int]:
    """A parse_positive whose messages say what the number means, e.g. 'RAM in MB, e.g. 2048'."""

    def parse(text: str) -> int:
        return parse_positive(text, expected, maximum)

    return parse


def parse_hostgroups(text: str) -> tuple[str, ...]:
    if text in ("", "-"):
        return ()
    groups = text.split(",")
    for group in groups:
        if not NAME_PATTERN.fullmatch(group):
            raise FieldError(
                f"has an invalid hostgroup {shown(group)} (expected a comma list of names made of {NAME_RULE},"
                " or '-' for none)"
            )
    if (twice := _first_repeat(groups)) is not None:
        raise FieldError(f"names hostgroup {twice!r} twice (expected each hostgroup once)")
    return tuple(groups)


def _first_repeat(names: list[str]) -> str | None:
    """The first name seen a second time, through a set: a pasted list of 100,000 names is read at once."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


@dataclass(frozen=True)
class Column:
    name: str
    parse: Callable[[str], Any]
    meaning: str
    rules: str


COLUMNS: tuple[Column, ...] = (
    Column("name", parse_name, "VM name = hostname", "RFC 1123 label, lowercase, starts with a letter, unique"),
    Column("mac", parse_mac, "MAC of the primary NIC", "`xx:xx:xx:xx:xx:xx`, unicast, unique"),
    Column("ip", parse_ipv4, "IPv4 address on the VM's network",
           "inside the network's subnet, unique, not its network/broadcast/gateway/provision-server"
           " address, outside the dynamic DHCP ranges"),
    Column("ram", positive_parser("RAM in MB, e.g. 2048"), "RAM in MB", "positive integer"),
    Column("disk", positive_parser("disk size in GB, e.g. 20"), "disk size in GB", "positive integer"),
    Column("cpus", positive_parser("a vCPU count, e.g. 2", MAX_VCPUS), "vCPU count",
           f"positive integer, at most {MAX_VCPUS} (QEMU 7.2's q35 machine)"),
    Column("hostgroups", parse_hostgroups, "nagios hostgroups",
           "comma list, `-` or empty for none; must be listed in site.toml `[hostgroups]` when that exists"),
    Column("options", str, "optional `key=value` words, space separated", "see the options table"),
)
REQUIRED_COLUMNS = len(COLUMNS) - 1  # the options column may be left out


# --- options (8th column) -------------------------------------------------------------------


def _enum_parser(enum: type[Install] | type[Boot]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return enum(text)
        except ValueError:
            raise FieldError(f"is not allowed (expected {', '.join(member.value for member in enum)})") from None

    return parse


def parse_disk_kind(text: str) -> tuple[DiskKind, str | None]:
    kind, _, vg = text.partition(":")
    if kind == "lvm" and _VOLUME_GROUP.fullmatch(vg):
        return DiskKind.LVM, vg
    if kind in ("qcow2", "raw") and not vg:
        return DiskKind(kind), None
    raise FieldError("is not a disk kind (expected qcow2, raw or lvm:<volume group>)")


_YES_NO = "yes, no (also true/false, on/off, 1/0)"


def parse_bool(text: str) -> bool:
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise FieldError("is not a yes/no value (expected yes or no; true/false, on/off and 1/0 are taken too)")


def parse_word(text: str) -> str:
    if not NAME_PATTERN.fullmatch(text):
        raise FieldError(f"is not a name (expected {NAME_RULE})")
    return text


def parse_cpuset(text: str) -> tuple[int, ...]:
    """Parse a cpuset like ``2-3,6``; order is kept because vCPU i is pinned to the i-th CPU."""
    cpus: list[int] = []
    for part in text.split(","):
        match = _CPU_RANGE.fullmatch(part)
        if not match:
            raise FieldError("is not a CPU list (expected e.g. 2-5 or 2,3,8-9)")
        for number in match[1], match[2] or "0":
            if len(number) > len(str(MAX_CPU)) or int(number) > MAX_CPU:  # bounds the range below
                raise FieldError(f"names CPU {shown(number)}, beyond any host (expected CPU numbers 0-{MAX_CPU})")
        first = int(match[1])
        last = int(match[2]) if match[2] else first
        if last < first:
            raise FieldError(f"has a descending range {part!r} (expected low-high)")
        cpus.extend(range(first, last + 1))
    if len(set(cpus)) != len(cpus):
        twice = next(cpu for index, cpu in enumerate(cpus) if cpu in cpus[:index])
        raise FieldError(f"names CPU {twice} twice (expected each CPU once)")
    return tuple(cpus)


def parse_after(text: str) -> tuple[str, ...]:
    names = text.split(",")
    for name in names:
        if not LABEL.fullmatch(name):
            raise FieldError(f"has {shown(name)}, which is not a VM name (expected a comma list of VM names)")
    if (twice := _first_repeat(names)) is not None:
        raise FieldError(f"names {twice!r} twice (expected each VM once)")
    return tuple(names)


MACVTAP_MODES = ("bridge", "vepa", "private", "passthrough")
# Also used by site.py, so that every name or address cluster.conf may refer to is valid in site.toml and back.
PCI_PATTERN = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")  # lower case
IFACE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # Linux refuses ':' and '/' in interface names
NIC_GRAMMAR = ("bridge:<network>[/<mac>], macvtap:<host interface or its MAC>[:bridge|vepa|private|passthrough]"
               "[/<mac>], pci:<dddd:bb:ss.f>, vf:<physical function>[:<VF index>][/<mac>]")


def parse_nic(text: str) -> Nic:
    """One extra NIC: `kind:source[:detail][/mac]` (see NIC_GRAMMAR)."""
    kind, sep, rest = text.partition(":")
    rest, slash, mac_text = rest.partition("/")
    mac = parse_mac(mac_text) if slash else None
    if kind == "bridge" and sep and NAME_PATTERN.fullmatch(rest):
        return Nic(NicKind.BRIDGE, rest, mac=mac)
    if kind == "macvtap" and sep:
        # The interface may be given by its MAC, which holds colons itself.
        by_mac = MAC_PATTERN.match(rest.lower()) and rest[17:18] in ("", ":")
        device, mode = (rest[:17].lower(), rest[18:]) if by_mac else rest.partition(":")[::2]
        if (mode in MACVTAP_MODES or not mode) and (MAC_PATTERN.fullmatch(device) or IFACE_PATTERN.fullmatch(device)):
            return Nic(NicKind.MACVTAP, device, mode or "bridge", mac=mac)
        if mode and mode not in MACVTAP_MODES:
            raise FieldError(f"has macvtap mode {shown(mode)} (expected one of: {', '.join(MACVTAP_MODES)})")
    if kind == "pci" and sep and not slash:
        if PCI_PATTERN.fullmatch(rest.lower()):
            return Nic(NicKind.PCI, rest.lower())
        raise FieldError("is not a PCI address (expected pci:dddd:bb:ss.f, e.g. pci:0000:1a:00.1)")
    if kind == "vf" and sep:
        pf, colon, index = rest.partition(":")
        if IFACE_PATTERN.fullmatch(pf) and (not colon or (index.isascii() and index.isdigit() and len(index) < 4)):
            return Nic(NicKind.VF, pf, vf=int(index) if colon else None, mac=mac)
    raise FieldError(f"is not a NIC (expected {NIC_GRAMMAR})")


def parse_numa(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 3:
        raise FieldError("is not a NUMA node (expected a node number, e.g. 0)")
    return int(text)


def parse_keep(text: str) -> int:
    return parse_positive(text, "a number of restore points, e.g. 4")


@dataclass(frozen=True)
class Option:
    key: str
    parse: Callable[[str], Any]
    values: str  # what is allowed, for docs and messages
    default: str
    meaning: str
    repeatable: bool = False  # may be given several times; its value is then the tuple of all, in order


OPTIONS: tuple[Option, ...] = (
    Option("host", parse_word, "a `[hosts.*]` name from site.toml, or `auto`", "auto",
           "physical host; `auto` places the VM on the host with the most free RAM that fits it"),
    Option("install", _enum_parser(Install), "pxe, cloud, none", "pxe",
           "network install with a preseed (Debian OSes only, not the provision VM), cloud image + NoCloud seed"
           " (on a qcow2 disk), or nothing"),
    Option("os", parse_word, "an `[os.*]` name from site.toml", "site.toml `default_os`",
           "the OS installed (installer kernel/initrd or cloud image)"),
    Option("disk", parse_disk_kind, "`qcow2`, `raw`, `lvm:<vg>`", "qcow2",
           "disk kind: thin qcow2 file, raw file, or LVM volume `vm-<name>` in volume group `<vg>`"),
    Option("net", parse_word, "a `[networks.*]` name from site.toml", "site.toml `default_network`",
           "network (bridge, VLAN) of the primary NIC"),
    Option("boot", _enum_parser(Boot), "bios, uefi", "bios", "firmware"),
    Option("cpuset", parse_cpuset, "CPU list, e.g. `2-3` or `4,6`", "none",
           "pin vCPU i to the i-th CPU of the list; its size must equal the cpus column, it needs"
           " `host=<name>`, and no two VMs on a host may share a CPU; the host's `housekeeping_cpus` are"
           " refused, and the VM's emulator threads are pinned to them"),
    Option("nic", parse_nic, "`bridge:<network>`, `macvtap:<interface>[:<mode>]`, `pci:<dddd:bb:ss.f>`,"
           " `vf:<pf>[:<index>]`; `/<mac>` after any but pci", "none",
           "an extra NIC (repeatable, in order): a tap on a network's bridge; MACVTAP on a host interface"
           " listed in `[hosts.*] interfaces` (by name or MAC; mode bridge, vepa, private or passthrough,"
           " default bridge); a PCI function of `[hosts.*] pci` passed through, managed by libvirt; an SR-IOV"
           " VF of a PF in `[hosts.*] sriov`, chosen by libvirt from the PF's free VFs when the VM starts"
           " (through the host's hostdev network `vf-<pf>`), or pinned by index (needs the PF's VF addresses"
           " listed in `sriov`). Without `/<mac>` the n-th NIC's MAC is the VM's MAC with 4×n added to its first"
           " byte; a PCI function on two VMs of a host, or more VFs than the PF has, is refused", repeatable=True),
    Option("numa", parse_numa, "a NUMA node number", "none",
           "bind the VM's memory to this NUMA node of its host (strict; below `[hosts.*] numa_nodes`)"),
    Option("after", parse_after, "comma list of VM names defined earlier", "none",
           "deploy dependencies: this VM is deployed after those"),
    Option("autostart", parse_bool, _YES_NO, "yes", "start the VM when its host boots"),
    Option("backup", parse_bool, _YES_NO, "yes", "include the VM in the backup crontab run"),
    Option("keep", parse_keep, "positive integer", "site.toml `[backup] keep`", "restore points kept"),
)
OPTIONS_BY_KEY: dict[str, Option] = {option.key: option for option in OPTIONS}


def markdown_tables() -> str:
    """The README's tables of columns and options, generated from the tables above."""
    lines = ["| # | column | meaning | rules |", "|---|---|---|---|"]
    for number, column in enumerate(COLUMNS, 1):
        lines.append(f"| {number} | {column.name} | {column.meaning} | {column.rules} |")
    lines += ["", "| option | values | default | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        lines.append(f"| `{option.key}=` | {option.values} | {option.default} | {option.meaning} |")
    return "\n".join(lines) + "\n"
