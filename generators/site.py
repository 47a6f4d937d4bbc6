"""site.toml: cluster-wide settings (domain, networks, physical hosts, OSes, provision, backup).

Read with the stdlib ``tomllib``; every problem is collected with the line of the key it is about,
like cluster.conf's, and raised once as :class:`ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from generators.ansible import GROUP_RULE, group_clash
from generators.columns import IFACE_PATTERN, MAC_PATTERN, NAME_PATTERN, NAME_RULE, PCI_PATTERN
from generators.crontab import max_interval
from generators.errors import ConfigError, Problem, UsageError, shown
from generators.model import (
    Accounts,
    Backup,
    DomainType,
    Network,
    OsRelease,
    PhysicalHost,
    Provision,
    Site,
)
from generators.toml_reader import (
    MISSING,
    Locate,
    T,
    TableReader,
    control_char,
    locator,
    not_one_line,
    read_toml,
    type_of,
)

_CRYPT_HASH = re.compile(r"!|\$(6|y|gy|7)\$[./A-Za-z0-9$=,]+")
_SSH_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/=]+( .*)?")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
MAX_DNS_LABEL = 63  # RFC 1035, as dnsmasq and dnspython enforce it
MAX_DNS_NAME = 253  # characters of a name without its final dot: 255 octets on the wire (RFC 1035)
# The longest name derived from the domain is the SOA's hostmaster.<domain> (templates/zone.j2); this bound also
# keeps the file name dns/<domain>.zone within 255 characters.
MAX_DOMAIN = MAX_DNS_NAME - len("hostmaster.")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S*")
_TIMEZONE = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")  # IANA names: Europe/Berlin, Etc/GMT+5, UTC
ZONEINFO = Path("/usr/share/zoneinfo")
_LOCALE = re.compile(r"[a-z]{2,3}_[A-Z]{2}(\.[A-Za-z0-9-]+)?(@[A-Za-z0-9]+)?")
_MIRROR_HOST = re.compile(r"([^:]+)(?::([0-9]{1,5}))?")
_URL_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_PROXY = re.compile(r"https?://[^\s/]+/?")
# Debian's system accounts (base-passwd): the installer refuses them as the first user, and cloud-init would turn
# one into the admin account.
SYSTEM_USERS = frozenset({"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
                          "proxy", "www-data", "backup", "list", "irc", "gnats", "_apt", "nobody"})


def _absolute_path(r: TableReader, key: str, default: Any = MISSING, example: str = "") -> str | None:
    """A path on a server or host: absolute (relative to what? each tool has another working directory), and without
    whitespace, which dnsmasq.conf, the boot loaders and command lines would split it at."""
    path: str | None = r.get(key, str, default, "an absolute path")
    if isinstance(path, str) and (not path.startswith("/") or re.search(r"\s", path)):
        r.problem(key, f"{shown(path)} is not an absolute path (expected a path starting with '/', without whitespace,"
                  f" such as {example or default})")
        return None
    return path


def parse_http_url(url: str) -> tuple[str, int, str] | None:
    """(host, port, path prefix) of http://host[:port][/path], what `invoke provision-server` serves; None otherwise."""
    if any(c.isspace() for c in url):
        return None
    parts = urlsplit(url)
    try:
        port = parts.port if parts.port is not None else 80
    except ValueError:  # not a number, or out of range
        return None
    if parts.scheme != "http" or not parts.hostname or not port or parts.query or parts.fragment:
        return None
    return parts.hostname, port, parts.path.rstrip("/")


def _subnet(value: str) -> IPv4Network:
    try:
        return IPv4Network(value)
    except ValueError as err:
        if "host bits set" in str(err):
            raise ValueError(f"(host bits are set; expected {IPv4Network(value, strict=False)})") from None
        raise ValueError("(expected a.b.c.d/nn)") from None


def _addresses(value: list[Any]) -> tuple[IPv4Address, ...]:
    if not all(isinstance(item, str) for item in value):
        raise ValueError("(expected strings such as \"192.168.1.2\")")
    return tuple(IPv4Address(item) for item in value)


def _network(name: str, r: TableReader) -> Network | None:
    subnet = r.convert("subnet", _subnet, "an IPv4 network", "a.b.c.d/nn")
    bridge = r.get("bridge", str, what="a bridge interface name")
    if bridge is not None and not IFACE_PATTERN.fullmatch(bridge):
        r.problem("bridge", f"{shown(bridge)} is not an interface name (expected at most 15 letters, digits,"
                  " '-', '_', '.')")
        bridge = None
    gateway = r.convert("gateway", IPv4Address, "an IPv4 address", "a.b.c.d", default=None)
    vlan = r.get("vlan", int, default=None, what="a VLAN id (1-4094)")
    if vlan is not None and not 1 <= vlan <= 4094:
        r.problem("vlan", f"{shown(vlan)} is not a VLAN id (expected 1-4094)")
        vlan = None
    dns = r.convert("dns", _addresses, "a list of IPv4 addresses", '["a.b.c.d", ...]', default=(), kind=list)
    ranges = r.convert("dhcp_ranges", _parse_ranges, "a list of DHCP ranges", '["FIRST-LAST", ...]', default=(),
                       kind=list)
    if subnet is not None:
        if gateway is not None and gateway not in subnet:
            r.problem("gateway", f"'{gateway}' is outside subnet {subnet} (expected an address in it)")
        elif gateway in (subnet.network_address, subnet.broadcast_address):  # no host can answer there
            which = "network" if gateway == subnet.network_address else "broadcast"
            r.problem("gateway", f"'{gateway}' is the {which} address of subnet {subnet} (expected a host address"
                      " in it)")
        for first, last in ranges or ():
            if first not in subnet or last not in subnet:
                r.problem("dhcp_ranges", f"'{first}-{last}' is outside subnet {subnet} (expected a range in it)")
    ovs = r.get("ovs", bool, False, "true when the bridge is an Open vSwitch (VLAN tag on the guest port)")
    if subnet is None or bridge is None or ovs is None:
        return None
    return Network(name, subnet, bridge, gateway, vlan, dns or (), ranges or (), ovs=ovs)


def _check_subnets_apart(networks: dict[str, Network | None], locate: Locate, problems: list[Problem]) -> None:
    """Refuse a subnet that shares addresses with an earlier network's: their DHCP ranges and reverse zones clash."""
    earlier: list[Network] = []
    for name, network in networks.items():
        if network is None:
            continue
        other = next((seen for seen in earlier if seen.subnet.overlaps(network.subnet)), None)
        if other is not None:
            TableReader({}, f"networks.{name}", locate, problems).problem(
                "subnet", f"'{network.subnet}' overlaps network {other.name!r} ({other.subnet}) (expected a subnet"
                " that shares no address with another network's)")
        earlier.append(network)


def _check_host_addresses_apart(hosts: dict[str, PhysicalHost | None], locate: Locate,
                                problems: list[Problem]) -> None:
    """Refuse a host whose address is an earlier host's: the DNS would give one IP two names (two PTRs), and the
    Nagios backup check of one host would reach the other."""
    earlier: dict[str, str] = {}  # the address as compared (an IP normalised, a name in lower case): host
    for name, host in hosts.items():
        if host is None or host.address is None:
            continue
        key = str(host.ip) if host.ip is not None else host.address.lower().rstrip(".")
        other = earlier.setdefault(key, name)
        if other != name:
            TableReader({}, f"hosts.{name}", locate, problems).problem(
                "address", f"{shown(host.address)} is the address of host {other!r} too (expected each host's own"
                " address)")


def _tagging(network: Network) -> str:
    return f"vlan {network.vlan}" if network.vlan else "no vlan"


def _check_bridges_agree(networks: dict[str, Network | None], locate: Locate, problems: list[Problem]) -> None:
    """Refuse networks that would need one bridge (or one tagged host interface) to be two different things.

    Several subnets may share a bridge (one L2 segment), but a bridge is either an Open vSwitch or a Linux
    bridge, and a Linux bridge sits on one port of the host's uplink: the untagged NIC or one VLAN
    subinterface, which in turn joins that one bridge only. (An Open vSwitch tags each guest port, so its
    networks may differ in vlan.)
    """
    by_bridge: dict[str, Network] = {}
    by_vlan: dict[int, Network] = {}  # Linux-bridged VLANs only
    for name, network in networks.items():
        if network is None:
            continue
        r = TableReader({}, f"networks.{name}", locate, problems)
        other = by_bridge.setdefault(network.bridge, network)
        if other.ovs != network.ovs:
            r.problem("bridge", f"{shown(network.bridge)} is also the bridge of network {other.name!r}, where ovs ="
                      f" {str(other.ovs).lower()} (expected ovs = {str(other.ovs).lower()} here too, or a bridge of"
                      " its own: a bridge is either an Open vSwitch or a Linux bridge)")
        elif not network.ovs and other.vlan != network.vlan:
            r.problem("bridge", f"{shown(network.bridge)} is also the bridge of network {other.name!r}, which has"
                      f" {_tagging(other)}, and this one has {_tagging(network)} (expected {_tagging(other)} here too,"
                      " or a bridge of its own: a Linux bridge carries one VLAN; ovs = true tags each guest port)")
        elif not network.ovs and network.vlan:
            tagged = by_vlan.setdefault(network.vlan, network)
            if tagged.bridge != network.bridge:
                r.problem("vlan", f"{network.vlan} is also the vlan of network {tagged.name!r}, on bridge"
                          f" {tagged.bridge!r} (expected bridge = {tagged.bridge!r} here too, or another vlan: a"
                          " host's tagged interface <uplink>.<vlan> joins one bridge only)")


def _check_uplinks(networks: dict[str, Network | None], hosts: dict[str, PhysicalHost | None], locate: Locate,
                   problems: list[Problem]) -> None:
    """Refuse an uplink that fab kvm-setup would make the port of two untagged Linux bridges: a NIC joins one."""
    untagged: dict[str, str] = {}  # bridge -> its first network
    for name, network in networks.items():
        if network is not None and not network.ovs and not network.vlan:
            untagged.setdefault(network.bridge, name)
    if len(untagged) < 2:
        return
    (first, first_net), (second, second_net) = list(untagged.items())[:2]
    for name, host in hosts.items():
        if host is not None and host.uplink:
            TableReader({}, f"hosts.{name}", locate, problems).problem(
                "uplink", f"{shown(host.uplink)} would be the port of both untagged bridges {first!r} (network"
                f" {first_net!r}) and {second!r} (network {second_net!r}) (expected a vlan for all but one untagged"
                " network, one bridge for them, or no uplink: a NIC joins one bridge only)")


def _parse_ranges(value: list[Any]) -> tuple[tuple[IPv4Address, IPv4Address], ...]:
    ranges = []
    for item in value:
        parts = item.split("-") if isinstance(item, str) else []
        try:
            first, last = (IPv4Address(part.strip()) for part in parts)
        except ValueError:
            raise ValueError("(expected strings \"FIRST-LAST\" such as \"192.168.1.200-192.168.1.250\")") from None
        if last < first:
            raise ValueError(f"({item!r} ends before it starts; expected FIRST-LAST with FIRST <= LAST)")
        ranges.append((first, last))
    return tuple(ranges)


def is_host_address(value: str) -> bool:
    """An IP address or a DNS name: what ssh and check_by_ssh -H take, and nothing a shell would split."""
    try:
        ip_address(value)
        return True
    except ValueError:
        return len(value) <= MAX_DNS_NAME and bool(_DOMAIN.fullmatch(value.lower()))


def _host(name: str, r: TableReader) -> PhysicalHost | None:
    uri = r.get("uri", str, what="a libvirt URI such as qemu:///system")
    if uri is not None and not _URI.fullmatch(uri):
        r.problem("uri", f"{shown(uri)} is not a libvirt URI (expected e.g. qemu:///system or"
                  " qemu+ssh://root@HOST/system)")
        uri = None
    address = r.get("address", str, None, "the host's IP address or DNS name")
    bad_address = address is not None and not is_host_address(address)
    if bad_address:
        r.problem("address", f"{shown(address)} is not an IP address or DNS name (expected e.g. 192.168.1.4 or"
                  " kvm0.example.org)")
    values = dict(
        uri=uri,
        ram_mb=r.positive("ram_mb"),
        cpus=r.positive("cpus"),
        disk_gb=r.positive("disk_gb"),
        disk_dir=_absolute_path(r, "disk_dir", "/var/lib/libvirt/images"),
        ram_overcommit=r.positive("ram_overcommit", float, 1.0),
        cpu_overcommit=r.positive("cpu_overcommit", float, 1.0),
        disk_overcommit=r.positive("disk_overcommit", float, 1.0),
        address=address,
    )
    values.update(_host_devices(r, values["cpus"]))
    values.update(_host_setup(r))
    if any(value is None for key, value in values.items() if key != "address") or bad_address:
        return None
    keys = {key: r.locate(r.table, key) for key in ("address", "uri") if values[key] is not None}
    return PhysicalHost(name=name, where=r.locate(r.table, ""), where_key=keys, **values)


def _host_devices(r: TableReader, cpus: int | None) -> dict[str, Any]:
    """What a host offers VMs beyond RAM/CPU/disk: interfaces, PCI functions, SR-IOV VFs, housekeeping CPUs, NUMA."""
    values: dict[str, Any] = {}
    raw = r.get("interfaces", object, [], "a list of interface names, or a table name = MAC")
    interfaces: dict[str, str] | None = {}
    items = raw.items() if isinstance(raw, dict) else ((name, "") for name in raw) if isinstance(raw, list) else None
    for name, mac in items if items is not None else ():
        if not isinstance(name, str) or not IFACE_PATTERN.fullmatch(name) or not isinstance(mac, str) or (
                mac and not MAC_PATTERN.fullmatch(mac.lower())):
            r.problem("interfaces", f"{shown(name)} = {shown(mac)} is not an interface (expected a name of at most 15"
                      " letters, digits, '-', '_', '.', and optionally its MAC xx:xx:xx:xx:xx:xx)")
            interfaces = None
        elif interfaces is not None:
            interfaces[name] = mac.lower()
    if items is None:
        r.problem("interfaces", f"{shown(raw)} is {type_of(raw)} (expected a list of interface names, or a table"
                  " name = MAC)")
        interfaces = None
    values["interfaces"] = interfaces
    pci = r.get("pci", list, [], "a list of PCI addresses such as \"0000:1a:00.1\"")
    bad = [item for item in pci or () if not isinstance(item, str) or not PCI_PATTERN.fullmatch(item.lower())]
    if bad:
        r.problem("pci", f"{shown(bad[0])} is not a PCI address (expected dddd:bb:ss.f, e.g. 0000:1a:00.1)")
    values["pci"] = None if bad or pci is None else tuple(item.lower() for item in pci)
    sriov = r.get("sriov", dict, {}, "a table physical function = number of VFs, or = [VF PCI addresses]")
    counts: dict[str, int] | None = {}
    vfs: dict[str, tuple[str, ...]] = {}
    for pf, value in (sriov or {}).items():
        if not IFACE_PATTERN.fullmatch(pf):  # it names the host's NIC and the libvirt network vf-<pf>
            r.problem("sriov", f"{shown(pf)} is not an interface name (expected at most 15 letters, digits, '-', '_',"
                      " '.')")
            counts = None
        elif isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 256:
            if counts is not None:
                counts[pf] = value
        elif isinstance(value, list) and value and all(isinstance(a, str) and PCI_PATTERN.fullmatch(a.lower())
                                                       for a in value):
            if counts is not None:
                counts[pf] = len(value)
                vfs[pf] = tuple(a.lower() for a in value)
        else:
            r.problem("sriov", f"{pf} = {shown(value)} is not a VF count (expected a number of VFs 1-256, or the"
                      " list of the VFs' PCI addresses)")
            counts = None
    values["sriov"] = counts
    values["sriov_vfs"] = vfs
    housekeeping = r.get("housekeeping_cpus", str, "", "a CPU list such as \"0-1\"")
    values["housekeeping_cpus"] = ()
    if housekeeping:
        from generators.columns import FieldError, parse_cpuset  # columns imports model only: no cycle

        try:
            values["housekeeping_cpus"] = parse_cpuset(housekeeping)
        except FieldError as err:
            r.problem("housekeeping_cpus", f"{shown(housekeeping)} {err}")
            values["housekeeping_cpus"] = None
        if values["housekeeping_cpus"] and cpus is not None and max(values["housekeeping_cpus"]) >= cpus:
            r.problem("housekeeping_cpus", f"{shown(housekeeping)} names CPUs the host does not have (expected CPUs"
                      f" 0-{cpus - 1})")
            values["housekeeping_cpus"] = None
    values["numa_nodes"] = r.positive("numa_nodes", int, 1)
    return values


def _host_setup(r: TableReader) -> dict[str, Any]:
    """How `fab kvm-setup` prepares the host: the network stack for the bridges, their uplink NIC, nested virt."""
    stack = r.get("network_stack", str, "ifupdown", "ifupdown, netplan or networkmanager")
    if stack is not None and stack not in ("ifupdown", "netplan", "networkmanager"):
        r.problem("network_stack", f"{shown(stack)} is not a network stack (expected ifupdown, netplan or"
                  " networkmanager)")
        stack = None
    uplink = r.get("uplink", str, "", "the interface the bridges are on, such as eno1")
    if uplink and not IFACE_PATTERN.fullmatch(uplink):
        r.problem("uplink", f"{shown(uplink)} is not an interface name (expected at most 15 letters, digits,"
                  " '-', '_', '.')")
        uplink = None
    return {"network_stack": stack, "uplink": uplink, "nested": r.get("nested", bool, False)}


def _os(name: str, r: TableReader) -> OsRelease | None:
    family = r.get("family", str, what="debian or ubuntu")
    if family is not None and family not in ("debian", "ubuntu"):
        r.problem("family", f"{shown(family)} is not an OS family (expected debian or ubuntu)")
        family = None
    suite = r.get("suite", str, what="a release codename such as bookworm")
    # Only Debian's installer boots over PXE (install=pxe); other families install from cloud images.
    required = family != "ubuntu"
    kernel = _boot_file(r, "kernel", "the installer kernel's path under the TFTP root", required)
    initrd = _boot_file(r, "initrd", "the installer initrd's path under the TFTP root", required)
    cloud_image = _absolute_path(r, "cloud_image", None, "/var/lib/libvirt/images/base/debian-12.qcow2")
    if family is None or suite is None or kernel is None or initrd is None:
        return None
    return OsRelease(name, family, suite, kernel, initrd, cloud_image)


def _boot_file(r: TableReader, key: str, what: str, required: bool) -> str | None:
    """A path pxelinux's KERNEL/INITRD and GRUB's linux/initrd lines take: they end a path at whitespace."""
    path: str | None = r.get(key, str, MISSING if required else "", what)
    if path is not None and re.search(r"\s", path):
        r.problem(key, f"{shown(path)} is not a TFTP path the boot loaders can load (expected {what}, without"
                  " spaces)")
        return None
    return path


def _each(top: TableReader, table: str, build: Callable[[str, TableReader], T | None], what: str,
          option: str) -> dict[str, T | None]:
    """Build every entry of a table of tables such as [hosts.kvm0], [hosts.kvm1]; cluster.conf's `option`= names one."""
    entries = top.sub(table)
    result: dict[str, T | None] = {}
    for name, value in entries.data.items():
        entries.used.add(name)
        # The names reach generated files and commands (Nagios, cron, virsh): only what cluster.conf could name.
        if not NAME_PATTERN.fullmatch(name):
            entries.problem(name, f"is not a name cluster.conf's {option}= can take (expected {NAME_RULE})")
        elif option == "host" and name == "auto":
            entries.problem(name, "is host=auto's word for automatic placement (expected another host name)")
        if not isinstance(value, dict):
            entries.problem(name, f"{shown(value)} is {type_of(value)} (expected a table [{table}.{name}] {what})")
            result[name] = None
            continue
        reader = entries.sub(name)
        result[name] = build(name, reader)
        reader.check_unknown()
    if not entries.data and not entries.absent:
        top.problem(table, f"has no entries (expected at least one [{table}.NAME] table {what})")
    return result


def load_site(path: Path) -> Site:
    """Parse and check site.toml (and its optional secrets file); raise ConfigError listing all problems."""
    return load_site_located(path)[0]


def _timezone(top: TableReader) -> str | None:
    """The VMs' time zone: an IANA name, which the installer and cloud-init look up in /usr/share/zoneinfo."""
    timezone: str | None = top.get("timezone", str, "UTC")
    if timezone is None:
        return None
    if not _TIMEZONE.fullmatch(timezone):
        top.problem("timezone", f"{shown(timezone)} is not a time zone name (expected an IANA name such as"
                    " Europe/Berlin or UTC)")
        return None
    # Where this machine has the zone database (the VMs get the same one), a misspelt zone is caught here rather
    # than by an installer that silently falls back to UTC.
    if ZONEINFO.is_dir() and not _is_tzfile(ZONEINFO / timezone):
        top.problem("timezone", f"{shown(timezone)} is not a time zone of {ZONEINFO} (expected an IANA name such as"
                    f" Europe/Berlin or UTC, one that {ZONEINFO} holds: checked where that directory exists)")
        return None
    return timezone


def _is_tzfile(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(4) == b"TZif"
    except OSError:  # missing, a directory
        return False


def _check_mirror(p: TableReader, values: dict[str, Any]) -> None:
    """The Debian mirror's host, directory and proxy, which the preseed's mirror/http/* lines take as they are."""
    host = values["mirror_host"]
    m = _MIRROR_HOST.fullmatch(host) if host is not None else None
    if host is not None and not (m and is_host_address(m[1]) and (m[2] is None or 0 < int(m[2]) < 65536)):
        p.problem("mirror_host", f"{shown(host)} is not a mirror host (expected a host name or IPv4 address,"
                  " optionally with :port, such as deb.debian.org or 192.168.1.2:3142)")
        values["mirror_host"] = None
    directory = values["mirror_dir"]
    if directory is not None and not _URL_PATH.fullmatch(directory):
        p.problem("mirror_dir", f"{shown(directory)} is not an absolute URL path (expected the mirror's directory"
                  " starting with '/', without spaces, such as /debian)")
        values["mirror_dir"] = None
    proxy = values["mirror_proxy"]
    if proxy and not _PROXY.fullmatch(proxy):
        p.problem("mirror_proxy", f"{shown(proxy)} is not a proxy URL (expected http://host:port/, or \"\" for"
                  " none)")
        values["mirror_proxy"] = None


def _default_name(top: TableReader, key: str, names: dict[str, Any], noun: str) -> str:
    """The table entry VMs get when they name none: `key` if given (it must exist, "" included), else the first."""
    value = top.get(key, str, next(iter(names), ""))
    if isinstance(value, str) and value not in names and (value or key in top.data):
        expected = ", ".join(sorted(names)) or "none defined"
        top.problem(key, f"{shown(value)} is not {noun} (expected one of: {expected})")
    return value or ""


def load_site_located(path: Path) -> tuple[Site, Locate]:
    """load_site, plus where each key is, for later problems about site.toml (e.g. provision.vm)."""
    data, text = read_toml(path, "the site settings with --site, SITE=... or KVMCONF_SITE")
    problems: list[Problem] = []
    locate = locator(str(path), text)
    top = TableReader(data, "", locate, problems, one_line=True)

    domain = top.get("domain", str, what="a DNS domain such as cluster.lan")
    if domain is not None and not _DOMAIN.fullmatch(domain):
        top.problem("domain", f"{shown(domain)} is not a DNS domain (expected lowercase labels separated by dots)")
        domain = None
    elif domain is not None and (longest := max(map(len, domain.split(".")))) > MAX_DNS_LABEL:
        top.problem("domain", f"{shown(domain)} has a label of {longest} characters (expected labels of at most"
                    f" {MAX_DNS_LABEL} characters between the dots)")
        domain = None
    elif domain is not None and len(domain) > MAX_DOMAIN:
        top.problem("domain", f"{shown(domain)} is too long for DNS (expected at most {MAX_DOMAIN} characters, so"
                    f" that the zones' hostmaster.<domain> fits DNS's {MAX_DNS_NAME})")
        domain = None
    domain_type = top.convert("domain_type", DomainType, "a domain type", "kvm or qemu", default=DomainType.KVM)
    locale = top.get("locale", str, "en_US.UTF-8")
    if locale is not None and not _LOCALE.fullmatch(locale):
        top.problem("locale", f"{shown(locale)} is not a locale (expected language_COUNTRY.CHARSET such as en_US.UTF-8"
                    " or de_DE.UTF-8)")
        locale = None
    keyboard = top.get("keyboard", str, "us")
    timezone = _timezone(top)

    networks = _each(top, "networks", _network, "with subnet, bridge, ...", "net")
    _check_subnets_apart(networks, locate, problems)
    _check_bridges_agree(networks, locate, problems)
    hosts = _each(top, "hosts", _host, "with uri, ram_mb, cpus, disk_gb, ...", "host")
    _check_uplinks(networks, hosts, locate, problems)
    _check_host_addresses_apart(hosts, locate, problems)
    oses = _each(top, "os", _os, "with family, suite, kernel, initrd, ...", "os")

    default_network = _default_name(top, "default_network", networks, "a network")
    default_os = _default_name(top, "default_os", oses, "an OS")

    p = top.sub("provision")
    provision_values = dict(
        vm=p.get("vm", str, None, "the name of the provision server's VM in cluster.conf"),
        server=p.convert("server", IPv4Address, "an IPv4 address", "the provision server's address a.b.c.d",
                         default=None),
        http_url=p.get("http_url", str, what="the HTTP base URL of the provision server"),
        tftp_root=_absolute_path(p, "tftp_root", "/srv/tftp"),
        interface=p.get("interface", str, what="the interface dnsmasq serves"),
        mirror_host=p.get("mirror_host", str, "deb.debian.org"),
        mirror_dir=p.get("mirror_dir", str, "/debian"),
        mirror_proxy=p.get("mirror_proxy", str, ""),
        config_dir=_absolute_path(p, "config_dir", "/etc/kvmconf"),
    )
    _check_mirror(p, provision_values)
    if not p.absent and ("vm" in p.data) == ("server" in p.data):
        problems.append(Problem(locate("provision", ""), "table '[provision]' needs exactly one of 'vm' (the"
                                " provision VM's name in cluster.conf) or 'server' (its IPv4 address)"))
    interface = provision_values["interface"]
    if interface is not None and not IFACE_PATTERN.fullmatch(interface):  # dnsmasq's interface=, and the server's
        p.problem("interface", f"{shown(interface)} is not an interface name (expected at most 15 letters, digits,"
                  " '-', '_', '.')")
        provision_values["interface"] = None
    http_url = provision_values["http_url"]
    if http_url is not None and parse_http_url(http_url) is None:
        p.problem("http_url", f"{shown(http_url)} is not a URL the provision server can serve (expected"
                  " http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)")
        provision_values["http_url"] = None
    elif http_url:
        provision_values["http_url"] = http_url.rstrip("/")

    a = top.sub("accounts")
    secrets_name = a.get("secrets", str, None, "the secrets file's name, relative to site.toml")
    account_values: dict[str, Any] = dict(
        root_password_hash=a.get("root_password_hash", str, "!"),
        admin_user=a.get("admin_user", str, what="the name of the admin user created on every VM"),
        admin_password_hash=a.get("admin_password_hash", str, "!"),
        ssh_keys=a.get("ssh_keys", list, [], "a list of SSH public keys"),
        ssh_user=a.get("ssh_user", str, "root"),
    )
    readers = {key: a for key in account_values}
    if secrets_name:
        secrets = _load_secrets(path.parent / secrets_name, a, problems)
        if secrets is not None:
            secret_values, secret_reader = secrets
            account_values.update(secret_values)
            readers.update(dict.fromkeys(secret_values, secret_reader))
    for key in ("root_password_hash", "admin_password_hash"):
        value = account_values[key]
        if value is not None and not _CRYPT_HASH.fullmatch(value):
            readers[key].problem(key, "is not a crypt(3) hash (expected a SHA-512 '$6$...' or yescrypt '$y$...'"
                                 " hash, e.g. from mkpasswd -m sha-512, or '!' for a locked account; plain text"
                                 " is refused)")
            account_values[key] = None
    for key in account_values["ssh_keys"] or ():
        if not isinstance(key, str) or not _SSH_KEY.fullmatch(key):
            readers["ssh_keys"].problem("ssh_keys", f"{shown(key, 40)} is not an SSH public key (expected"
                                        " 'ssh-ed25519 AAAA... comment')")
            account_values["ssh_keys"] = None
    for key in ("admin_user", "ssh_user"):  # names in useradd, cloud-init and ssh's User lines
        user = account_values[key]
        if user is not None and not _USER.fullmatch(user):
            a.problem(key, f"{shown(user)} is not a user name (expected up to 32 lowercase letters, digits, '_', '-',"
                      " not starting with a digit or '-')")
            account_values[key] = None
    admin_user = account_values["admin_user"]
    if admin_user in SYSTEM_USERS:  # ssh_user may well be root: it logs in, it is not created
        a.problem("admin_user", f"{shown(admin_user)} is a system account of Debian, which the installer refuses as"
                  f" the user it creates (expected another name than {', '.join(sorted(SYSTEM_USERS))})")
        account_values["admin_user"] = None

    b = top.sub("backup", required=False)  # every key has a default
    backup_values = dict(
        schedule=b.get("schedule", str, "30 2 * * *"),
        dir=_absolute_path(b, "dir", "/var/backups/kvmconf"),
        nas_dir=_absolute_path(b, "nas_dir", None, "/mnt/nas/kvmconf"),
        keep=b.positive("keep", int, 1),
        full_every=b.positive("full_every", int, 7),
        log=_absolute_path(b, "log", "/var/log/kvmconf-backup.log"),
        checkout=_absolute_path(b, "checkout", "/root/kvmconf"),
    )
    schedule = backup_values["schedule"]
    if schedule is not None and len(schedule.split()) != 5:
        b.problem("schedule", f"{shown(schedule)} is not a cron schedule (expected 5 fields, e.g. '30 2 * * *')")
        backup_values["schedule"] = None
    elif schedule is not None:
        try:
            max_interval(schedule)  # the Nagios check's age limit comes from it
        except ValueError:
            b.problem("schedule", f"{shown(schedule)} is not a cron schedule kvmconf reads (expected numbers, *,"
                      " ranges, lists and steps, e.g. '30 2 * * 1-5', within minute 0-59, hour 0-23, day 1-31,"
                      " month 1-12, weekday 0-7; no names such as mon)")
            backup_values["schedule"] = None

    hostgroups: dict[str, str] | None = None
    top.used.add("hostgroups")  # an allowed key even when absent: a misspelt [hostgroup]'s message must list it
    if "hostgroups" in data:
        h = top.sub("hostgroups")
        hostgroups = {}
        claimed: dict[str, str] = {}  # Ansible group name -> the hostgroup it is
        for group, alias in h.data.items():
            h.used.add(group)
            if not NAME_PATTERN.fullmatch(group):
                h.problem(group, f"is not a hostgroup name (expected {NAME_RULE})")
            elif clash := group_clash(group, hosts, claimed):
                h.problem(group, f"would be {clash} in ansible/inventory.ini (expected {GROUP_RULE})")
            elif not isinstance(alias, str):
                h.problem(group, f"{shown(alias)} is {type_of(alias)} (expected a string: the hostgroup's"
                          " description)")
            elif (char := control_char(alias)) is not None:
                h.problem(group, not_one_line(alias, char))
            else:
                hostgroups[group] = alias

    for reader in (top, p, a, b):
        reader.check_unknown()
    if problems:
        raise ConfigError(problems)
    site = Site(
        domain=domain,
        domain_type=domain_type,  # type: ignore[arg-type]  # not None: that would have been a problem
        locale=locale,
        keyboard=keyboard,
        timezone=timezone,  # type: ignore[arg-type]  # not None: that would have been a problem
        networks={k: v for k, v in networks.items() if v},
        hosts={k: v for k, v in hosts.items() if v},
        oses={k: v for k, v in oses.items() if v},
        default_network=default_network,
        default_os=default_os,
        provision=Provision(**provision_values),
        accounts=Accounts(**{**account_values, "ssh_keys": tuple(account_values["ssh_keys"])}),
        backup=Backup(**backup_values),
        hostgroups=hostgroups,
        path=str(path),
    )
    return site, locate


def _load_secrets(path: Path, accounts: TableReader,
                  problems: list[Problem]) -> tuple[dict[str, Any], TableReader] | None:
    """Values of [accounts] kept out of version control; a missing file keeps site.toml's values."""
    if not path.exists():
        return None
    try:
        data, text = read_toml(path, "the secrets file")
    except ConfigError as err:
        problems.extend(err.problems)
        return None
    except UsageError as err:  # a directory, unreadable: a mistake in site.toml's secrets key
        accounts.problem("secrets", f"{str(err).removeprefix(f'{path}: ')} (expected a TOML file with an"
                         " [accounts] table, or no file)")
        return None
    top = TableReader(data, "", locator(str(path), text), problems, one_line=True)
    a = top.sub("accounts")
    values = {}
    for key, kind in (("root_password_hash", str), ("admin_password_hash", str), ("ssh_keys", list)):
        a.used.add(key)
        if key in a.data and (value := a.get(key, kind)) is not None:
            values[key] = value
    a.check_unknown()
    top.check_unknown()
    return values, a
