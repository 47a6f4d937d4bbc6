"""The forms of site.toml's single values: a DNS domain, a locale, a time zone, a keyboard, paths, interface names,
URLs, mirrors.

Each ``read_*`` reads one key through a :class:`TableReader` and returns its value, or None after recording why it
is refused; the other functions answer for a value the rest of kvmconf checks too (nagios, the provision server).
"""

from __future__ import annotations

import contextlib
import re
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from generators.columns import IFACE_PATTERN
from generators.errors import shown
from generators.toml_reader import MISSING, TableReader

_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
MAX_DNS_LABEL = 63  # RFC 1035, as dnsmasq and dnspython enforce it
MAX_DNS_NAME = 253  # characters of a name without its final dot: 255 octets on the wire (RFC 1035)
# The longest name derived from the domain is the SOA's hostmaster.<domain> (templates/zone.j2); this bound also
# keeps the file name dns/<domain>.zone within 255 characters.
MAX_DOMAIN = MAX_DNS_NAME - len("hostmaster.")
_TIMEZONE = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")  # IANA names: Europe/Berlin, Etc/GMT+5, UTC
_LOCALE = re.compile(r"[a-z]{2,3}_[A-Z]{2}(\.[A-Za-z0-9-]+)?(@[A-Za-z0-9]+)?")
# What the installer's keyboard-configuration/xkb-keymap takes: an xkb layout, optionally with a variant (fr(latin9)).
_KEYBOARD = re.compile(r"([a-z][a-z0-9_-]*)(?:\(([A-Za-z0-9_-]+)\))?")
_MIRROR_HOST = re.compile(r"([^:]+)(?::([0-9]{1,5}))?")
_URL_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
_PROXY = re.compile(r"(https?://[^\s/]+/?)?")  # "" for none
IFACE_RULE = "at most 15 letters, digits, '-', '_', '.'"


def read_matching(r: TableReader, key: str, pattern: re.Pattern[str], refusal: str, default: Any = MISSING,
                  what: str = "") -> str | None:
    """A string that ``pattern`` matches in full; else None, and the problem: the value, then ``refusal``."""
    value: str | None = r.get(key, str, default, what)
    if value is not None and not pattern.fullmatch(value):
        r.problem(key, f"{shown(value)} {refusal}")
        return None
    return value


def read_domain(top: TableReader) -> str | None:
    """The cluster's DNS domain: every VM and host is NAME.DOMAIN, and the zones are named after it."""
    domain: str | None = top.get("domain", str, what="a DNS domain such as cluster.lan")
    if domain is not None and not _DOMAIN.fullmatch(domain):
        top.problem("domain", f"{shown(domain)} is not a DNS domain (expected lowercase labels separated by dots)")
        return None
    if domain is not None and (longest := max(map(len, domain.split(".")))) > MAX_DNS_LABEL:
        top.problem("domain", f"{shown(domain)} has a label of {longest} characters (expected labels of at most"
                    f" {MAX_DNS_LABEL} characters between the dots)")
        return None
    if domain is not None and len(domain) > MAX_DOMAIN:
        top.problem("domain", f"{shown(domain)} is too long for DNS (expected at most {MAX_DOMAIN} characters, so"
                    f" that the zones' hostmaster.<domain> fits DNS's {MAX_DNS_NAME})")
        return None
    return domain


def read_locale(top: TableReader) -> str | None:
    return read_matching(top, "locale", _LOCALE, "is not a locale (expected language_COUNTRY.CHARSET such as"
                         " en_US.UTF-8 or de_DE.UTF-8)", "en_US.UTF-8")


def read_timezone(top: TableReader, zoneinfo: Path) -> str | None:
    """The VMs' time zone: an IANA name, which the installer and cloud-init look up in /usr/share/zoneinfo."""
    timezone = read_matching(top, "timezone", _TIMEZONE, "is not a time zone name (expected an IANA name such as"
                             " Europe/Berlin or UTC)", "UTC")
    # Where this machine has the zone database (the VMs get the same one), a misspelt zone is caught here rather
    # than by an installer that silently falls back to UTC.
    if timezone is not None and zoneinfo.is_dir() and not _is_tzfile(zoneinfo / timezone):
        top.problem("timezone", f"{shown(timezone)} is not a time zone of {zoneinfo} (expected an IANA name such as"
                    f" Europe/Berlin or UTC, one that {zoneinfo} holds: checked where that directory exists)")
        return None
    return timezone


def read_keyboard(top: TableReader, xkb_rules: Path) -> str | None:
    """The VMs' keyboard, as the installer's xkb-keymap question takes it: a layout such as us, or fr(latin9)."""
    expected = "expected an xkb layout, optionally with its variant in parentheses, such as us, de or fr(latin9)"
    keyboard = read_matching(top, "keyboard", _KEYBOARD, f"is not a keyboard layout ({expected})", "us")
    # Where this machine has xkb's list (the installer's comes from the same xkb-data), a misspelt layout is
    # caught here rather than by an installer that stops to ask for one.
    if keyboard is not None and xkb_rules.is_file() and keyboard not in _xkb_keymaps(xkb_rules):
        top.problem("keyboard", f"{shown(keyboard)} is not a layout of {xkb_rules} ({expected}, one that file lists:"
                    " checked where it exists)")
    return keyboard


def _xkb_keymaps(rules: Path) -> set[str]:
    """Every `layout` and `layout(variant)` of an xkb rules list (its '! layout' and '! variant' sections)."""
    keymaps: set[str] = set()
    section = ""
    for line in rules.read_text(errors="replace").splitlines():
        if line.startswith("!"):
            section = line[1:].strip()
        elif section == "layout" and (fields := line.split()):
            keymaps.add(fields[0])
        elif section == "variant" and len(fields := line.split()) >= 2 and fields[1].endswith(":"):
            keymaps.add(f"{fields[1][:-1]}({fields[0]})")  # "  latin9   fr: French (legacy, alt.)"
    return keymaps


def _is_tzfile(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(4) == b"TZif"
    except OSError:  # missing, a directory
        return False


def read_absolute_path(r: TableReader, key: str, default: Any = MISSING, example: str = "") -> str | None:
    """A path on a server or host: absolute (relative to what? each tool has another working directory), and without
    whitespace, which dnsmasq.conf, the boot loaders and command lines would split it at."""
    path: str | None = r.get(key, str, default, "an absolute path")
    if isinstance(path, str) and (not path.startswith("/") or re.search(r"\s", path)):
        r.problem(key, f"{shown(path)} is not an absolute path (expected a path starting with '/', without whitespace,"
                  f" such as {example or default})")
        return None
    return path


def read_interface_name(r: TableReader, key: str, what: str, default: Any = MISSING) -> str | None:
    """A network interface's name (a bridge, a NIC); the default, such as "" for none, is taken as it is."""
    name: str | None = r.get(key, str, default, what)
    if name is not None and name != default and not IFACE_PATTERN.fullmatch(name):
        r.problem(key, f"{shown(name)} is not an interface name (expected {IFACE_RULE})")
        return None
    return name


def is_host_address(value: str) -> bool:
    """An IP address or a DNS name: what ssh and check_by_ssh -H take, and nothing a shell would split."""
    try:
        ip_address(value)
        return True
    except ValueError:
        return len(value) <= MAX_DNS_NAME and bool(_DOMAIN.fullmatch(value.lower()))


def parse_name_servers(value: list[Any], rule: str, loopback: str) -> tuple[IPv4Address, ...]:
    """A list of name servers' IPv4 addresses, the one parser of [networks.*] dns and [provision] upstream_dns.

    Each entry goes as it is into dnsmasq.conf (dns-server option, server=), the preseeds and cloud-init's
    network-config, so only an address a name server can answer at passes. The error names the first entry that is
    not one, after ``rule`` (what the key takes); ``loopback`` says why a loopback address is none there.
    """
    addresses = []
    for item in value:
        address = None
        if isinstance(item, str):  # IPv4Address would take the integer 3 as 0.0.0.3
            with contextlib.suppress(ValueError):
                address = IPv4Address(item)
        if address is None:
            reason = "is not an IPv4 address"
        elif address.is_loopback:
            reason = f"is a loopback address, {loopback}"
        elif address.is_unspecified or address.is_multicast or address.is_reserved:  # 255.255.255.255 is reserved
            reason = "is not the unicast address of a name server"
        else:
            addresses.append(address)
            continue
        raise ValueError(f"(expected {rule}; {shown(item)} {reason})")
    return tuple(addresses)


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


# The installer's kernel command line (x86: at most 2048 bytes, the rest cut off) carries the preseed's URL with the
# VM's name and domain (at most 63 and 242 characters) and about 200 characters of other arguments.
MAX_HTTP_URL = 1024


def read_http_url(p: TableReader) -> str | None:
    """[provision] http_url, without a trailing slash: the URLs of generators/urls.py append to it."""
    http_url: str | None = p.get("http_url", str, what="the HTTP base URL of the provision server")
    if http_url is not None and parse_http_url(http_url) is None:
        p.problem("http_url", f"{shown(http_url)} is not a URL the provision server can serve (expected"
                  " http://host[:port][/path], e.g. http://192.168.1.2: it serves plain HTTP)")
        return None
    if http_url is not None and len(http_url) > MAX_HTTP_URL:
        p.problem("http_url", f"{shown(http_url)} is too long for the installer's kernel command line (expected at"
                  f" most {MAX_HTTP_URL} characters, which leaves room for the VM's name and domain in its 2048)")
        return None
    return http_url.rstrip("/") if http_url else http_url


# The Debian mirror's host, directory and proxy: the preseed's mirror/http/* lines take them as they are.

def read_mirror_host(p: TableReader) -> str | None:
    host: str | None = p.get("mirror_host", str, "deb.debian.org")
    m = _MIRROR_HOST.fullmatch(host) if host is not None else None
    if host is not None and not (m and is_host_address(m[1]) and (m[2] is None or 0 < int(m[2]) < 65536)):
        p.problem("mirror_host", f"{shown(host)} is not a mirror host (expected a host name or IPv4 address,"
                  " optionally with :port, such as deb.debian.org or 192.168.1.2:3142)")
        return None
    return host


def read_mirror_dir(p: TableReader) -> str | None:
    return read_matching(p, "mirror_dir", _URL_PATH, "is not an absolute URL path (expected the mirror's directory"
                         " starting with '/', without spaces, such as /debian)", "/debian")


def read_mirror_proxy(p: TableReader) -> str | None:
    return read_matching(p, "mirror_proxy", _PROXY, "is not a proxy URL (expected http://host:port/, or \"\" for"
                         " none)", "")
