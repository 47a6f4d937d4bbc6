"""site.toml: cluster-wide settings (domain, networks, physical hosts, OSes, provision, backup).

Read with the stdlib ``tomllib``; every problem is collected with the line of the key it is about,
like cluster.conf's, and raised once as :class:`ConfigError`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from pathlib import Path
from typing import Any, TypeVar

from generators.errors import ConfigError, Location, Problem, UsageError
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

T = TypeVar("T")
_MISSING: Any = object()
_CRYPT_HASH = re.compile(r"!|\$(6|y|gy|7)\$[./A-Za-z0-9$=,]+")
_SSH_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/=]+( .*)?")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_IFACE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")


class _Reader:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, data: dict[str, Any], table: str, locate: Callable[[str, str], Location],
                 problems: list[Problem]) -> None:
        self.data = data
        self.table = table
        self.locate = locate
        self.problems = problems
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.table}.{key}" if self.table else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.locate(self.table, key), f"key '{self.where(key)}': {message}"))

    def get(self, key: str, kind: type, default: Any = _MISSING, what: str = "") -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.problems.append(Problem(self.locate(self.table, ""),
                                             f"key '{self.where(key)}' is missing (expected {what or kind.__name__})"))
            return None if default is _MISSING else default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(key, f"{value!r} is not {what or 'a ' + kind.__name__}")
            return None
        return value

    def convert(self, key: str, convert: Callable[[Any], T], what: str, default: Any = _MISSING) -> T | None:
        raw = self.get(key, object, default, what)
        if raw is None or raw is default:
            return raw  # type: ignore[no-any-return]
        try:
            return convert(raw)
        except (ValueError, TypeError):
            self.problem(key, f"{raw!r} is not {what}")
            return None

    def positive(self, key: str, kind: type = int, default: Any = _MISSING) -> Any:
        value = self.get(key, kind, default, f"a positive {'number' if kind is float else 'integer'}")
        if value is not None and value <= 0:
            self.problem(key, f"{value!r} is not positive (expected a number > 0)")
            return None
        return value

    def table_of(self, key: str, required: bool = True) -> dict[str, Any]:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                self.problems.append(Problem(self.locate(self.table, ""),
                                             f"table '[{self.where(key)}]' is missing"))
            return {}
        if not isinstance(value, dict):
            self.problem(key, "is not a table")
            return {}
        return value

    def sub(self, key: str, required: bool = True) -> _Reader:
        return _Reader(self.table_of(key, required), self.where(key), self.locate, self.problems)

    def check_unknown(self) -> None:
        for key in sorted(set(self.data) - self.used):
            self.problem(key, f"unknown key (expected one of: {', '.join(sorted(self.used))})")


def _locator(path: str, text: str) -> Callable[[str, str], Location]:
    """Find the line of ``key`` inside table ``[table]``, so messages can point at it."""
    header = re.compile(r"\s*\[\s*([^\]]+?)\s*\]")
    keyline = re.compile(r"\s*([A-Za-z0-9_\"-]+)\s*=")
    index: dict[tuple[str, str], int] = {}
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        if m := header.match(line):
            current = m[1].replace('"', "").replace(" ", "")
            index.setdefault((current, ""), number)
        elif m := keyline.match(line):
            index.setdefault((current, m[1].strip('"')), number)

    def locate(table: str, key: str) -> Location:
        line = index.get((table, key)) or index.get((table, "")) or 0
        return Location(path, line, 1 if line else 0)

    return locate


def _network(name: str, r: _Reader) -> Network | None:
    subnet = r.convert("subnet", lambda v: IPv4Network(v), "an IPv4 network (expected a.b.c.d/nn)")
    bridge = r.get("bridge", str, what="a bridge interface name")
    if bridge is not None and not _IFACE.fullmatch(bridge):
        r.problem("bridge", f"{bridge!r} is not an interface name (expected at most 15 letters, digits, '-', '_', '.')")
    gateway = r.convert("gateway", IPv4Address, "an IPv4 address", default=None)
    vlan = r.get("vlan", int, default=None, what="a VLAN id (1-4094)")
    if vlan is not None and not 1 <= vlan <= 4094:
        r.problem("vlan", f"{vlan!r} is not a VLAN id (expected 1-4094)")
    dns = r.convert("dns", lambda v: tuple(IPv4Address(a) for a in v), "a list of IPv4 addresses", default=())
    ranges = r.convert("dhcp_ranges", _parse_ranges, "a list of 'first-last' IPv4 ranges", default=())
    if subnet is not None:
        if gateway is not None and gateway not in subnet:
            r.problem("gateway", f"'{gateway}' is outside subnet {subnet}")
        for first, last in ranges or ():
            if first not in subnet or last not in subnet:
                r.problem("dhcp_ranges", f"'{first}-{last}' is outside subnet {subnet}")
    if subnet is None or bridge is None:
        return None
    return Network(name, subnet, bridge, gateway, vlan, dns or (), ranges or ())


def _parse_ranges(value: Any) -> tuple[tuple[IPv4Address, IPv4Address], ...]:
    if not isinstance(value, list):
        raise TypeError
    ranges = []
    for item in value:
        first, last = (IPv4Address(part.strip()) for part in item.split("-"))
        if last < first:
            raise ValueError
        ranges.append((first, last))
    return tuple(ranges)


def _host(name: str, r: _Reader) -> PhysicalHost | None:
    values = dict(
        uri=r.get("uri", str, what="a libvirt URI such as qemu:///system"),
        ram_mb=r.positive("ram_mb"),
        cpus=r.positive("cpus"),
        disk_gb=r.positive("disk_gb"),
        disk_dir=r.get("disk_dir", str, "/var/lib/libvirt/images"),
        ram_overcommit=r.positive("ram_overcommit", float, 1.0),
        cpu_overcommit=r.positive("cpu_overcommit", float, 1.0),
        disk_overcommit=r.positive("disk_overcommit", float, 1.0),
        address=r.get("address", str, None),
    )
    if any(values[k] is None for k in ("uri", "ram_mb", "cpus", "disk_gb", "disk_dir")):
        return None
    return PhysicalHost(name=name, **values)


def _os(name: str, r: _Reader) -> OsRelease | None:
    family = r.get("family", str, what="debian or ubuntu")
    if family is not None and family not in ("debian", "ubuntu"):
        r.problem("family", f"{family!r} is not an OS family (expected debian or ubuntu)")
        family = None
    suite = r.get("suite", str, what="a release codename such as bookworm")
    kernel = r.get("kernel", str, what="the installer kernel's path under the TFTP root")
    initrd = r.get("initrd", str, what="the installer initrd's path under the TFTP root")
    cloud_image = r.get("cloud_image", str, None)
    if None in (family, suite, kernel, initrd):
        return None
    return OsRelease(name, family, suite, kernel, initrd, cloud_image)


def _each(top: _Reader, table: str, build: Callable[[str, _Reader], T | None]) -> dict[str, T | None]:
    """Build every entry of a table of tables such as [hosts.kvm0], [hosts.kvm1]."""
    entries = top.sub(table)
    result = {}
    for name in entries.data:
        reader = entries.sub(name)
        result[name] = build(name, reader)
        reader.check_unknown()
    return result


def load_site(path: Path) -> Site:
    """Parse and check site.toml (and its optional secrets file); raise ConfigError listing all problems."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (give the site settings with SITE=... or KVMCONF_SITE)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a site.toml file") from None
    except UnicodeDecodeError as err:
        raise ConfigError([Problem(Location(str(path)), f"is not UTF-8 text (byte {err.start})")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(err))
        loc = Location(str(path), int(m[1]), int(m[2])) if m else Location(str(path))
        raise ConfigError([Problem(loc, f"not valid TOML: {str(err).split(' (at')[0]}")]) from None

    problems: list[Problem] = []
    locate = _locator(str(path), text)
    top = _Reader(data, "", locate, problems)

    domain = top.get("domain", str, what="a DNS domain such as cluster.lan")
    if domain is not None and not _DOMAIN.fullmatch(domain):
        top.problem("domain", f"{domain!r} is not a DNS domain (expected lowercase labels separated by dots)")
    domain_type = top.convert("domain_type", DomainType, "a domain type (expected kvm or qemu)", default=DomainType.KVM)
    locale = top.get("locale", str, "en_US.UTF-8")
    keyboard = top.get("keyboard", str, "us")
    timezone = top.get("timezone", str, "UTC")

    networks = _each(top, "networks", _network)
    hosts = _each(top, "hosts", _host)
    oses = _each(top, "os", _os)
    for table, found in (("networks", networks), ("hosts", hosts), ("os", oses)):
        if not found and table in data:
            problems.append(Problem(locate(table, ""), f"table '[{table}]' has no entries"))

    default_network = top.get("default_network", str, next(iter(networks), ""))
    if default_network and default_network not in networks:
        top.problem("default_network", f"{default_network!r} is not a network (expected one of: {', '.join(sorted(networks))})")
    default_os = top.get("default_os", str, next(iter(oses), ""))
    if default_os and default_os not in oses:
        top.problem("default_os", f"{default_os!r} is not an OS (expected one of: {', '.join(sorted(oses))})")

    p = top.sub("provision")
    provision_values = dict(
        vm=p.get("vm", str, None),
        server=p.convert("server", IPv4Address, "an IPv4 address (expected the provision server's address)", default=None),
        http_url=p.get("http_url", str, what="the HTTP base URL of the provision server"),
        tftp_root=p.get("tftp_root", str, "/srv/tftp"),
        interface=p.get("interface", str, what="the interface dnsmasq serves"),
        mirror_host=p.get("mirror_host", str, "deb.debian.org"),
        mirror_dir=p.get("mirror_dir", str, "/debian"),
        mirror_proxy=p.get("mirror_proxy", str, ""),
        config_dir=p.get("config_dir", str, "/etc/kvmconf"),
    )
    if (provision_values["vm"] is None) == (provision_values["server"] is None):
        problems.append(Problem(locate("provision", ""), "table '[provision]' needs exactly one of 'vm' (the"
                                " provision VM's name in cluster.conf) or 'server' (its IPv4 address)"))
    if provision_values["http_url"] is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", provision_values["http_url"]):
        p.problem("http_url", f"{provision_values['http_url']!r} is not an http(s) URL")
        provision_values["http_url"] = None
    elif provision_values["http_url"]:
        provision_values["http_url"] = provision_values["http_url"].rstrip("/")

    a = top.sub("accounts")
    secrets_name = a.get("secrets", str, None)
    account_values: dict[str, Any] = dict(
        root_password_hash=a.get("root_password_hash", str, "!"),
        admin_user=a.get("admin_user", str, what="the name of the admin user created on every VM"),
        admin_password_hash=a.get("admin_password_hash", str, "!"),
        ssh_keys=a.get("ssh_keys", list, [], "a list of SSH public keys"),
        ssh_user=a.get("ssh_user", str, "root"),
    )
    if secrets_name:
        account_values.update(_load_secrets(path.parent / secrets_name, problems))
    for key in ("root_password_hash", "admin_password_hash"):
        value = account_values[key]
        if value is not None and not _CRYPT_HASH.fullmatch(value):
            a.problem(key, "is not a crypt(3) hash (expected a SHA-512 '$6$...' or yescrypt '$y$...' hash,"
                      " e.g. from mkpasswd -m sha-512, or '!' for a locked account; plain text is refused)")
            account_values[key] = None
    for key in account_values["ssh_keys"] or ():
        if not isinstance(key, str) or not _SSH_KEY.fullmatch(key):
            a.problem("ssh_keys", f"{str(key)[:40]!r} is not an SSH public key (expected 'ssh-ed25519 AAAA... comment')")
    if account_values["admin_user"] is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", account_values["admin_user"]):
        a.problem("admin_user", f"{account_values['admin_user']!r} is not a user name (expected lowercase letters, digits, '_', '-')")
        account_values["admin_user"] = None

    b = top.sub("backup")
    backup_values = dict(
        schedule=b.get("schedule", str, "30 2 * * *"),
        dir=b.get("dir", str, "/var/backups/kvmconf"),
        nas_dir=b.get("nas_dir", str, None),
        keep=b.positive("keep", int, 1),
        full_every=b.positive("full_every", int, 7),
        log=b.get("log", str, "/var/log/kvmconf-backup.log"),
        checkout=b.get("checkout", str, "/root/kvmconf"),
    )
    if backup_values["schedule"] is not None and len(backup_values["schedule"].split()) != 5:
        b.problem("schedule", f"{backup_values['schedule']!r} is not a cron schedule (expected 5 fields, e.g. '30 2 * * *')")
        backup_values["schedule"] = None

    hostgroups: dict[str, str] | None = None
    if "hostgroups" in data:
        raw = top.table_of("hostgroups")
        hostgroups = {}
        for group, alias in raw.items():
            if not isinstance(alias, str):
                top.sub("hostgroups").problem(group, f"{alias!r} is not a string (expected the hostgroup's description)")
            else:
                hostgroups[group] = alias

    for reader in (top, p, a, b):
        reader.check_unknown()
    if problems:
        raise ConfigError(problems)
    assert domain is not None and domain_type is not None  # for mypy: problems would have been raised
    return Site(
        domain=domain,
        domain_type=domain_type,
        locale=locale,
        keyboard=keyboard,
        timezone=timezone,
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


def _load_secrets(path: Path, problems: list[Problem]) -> dict[str, Any]:
    """Values of [accounts] kept out of version control; a missing file keeps site.toml's values."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        problems.append(Problem(Location(str(path)), f"not valid TOML: {err}"))
        return {}
    allowed = ("root_password_hash", "admin_password_hash", "ssh_keys")
    values = {}
    for key, value in data.get("accounts", {}).items():
        if key not in allowed:
            problems.append(Problem(Location(str(path)), f"key 'accounts.{key}': unknown key (expected one of: {', '.join(allowed)})"))
        elif not isinstance(value, list if key == "ssh_keys" else str):
            problems.append(Problem(Location(str(path)), f"key 'accounts.{key}': {value!r} has the wrong type"))
        else:
            values[key] = value
    return values
