"""site.toml: cluster-wide settings (domain, networks, physical hosts, OSes, provision, backup).

Read with the stdlib ``tomllib`` (through generators/toml_reader.py); every problem is collected with the line of
the key it is about, like cluster.conf's, and raised once as :class:`ConfigError`. The sections with a module of
their own: site_networks.py, site_hosts.py, site_accounts.py; the forms of single values: site_values.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath
from typing import Any

from generators.ansible import GROUP_RULE, group_clash, group_name, host_group_clashes
from generators.columns import NAME_PATTERN, NAME_RULE
from generators.crontab import max_interval, runs_in_two_years
from generators.errors import ConfigError, Problem, shown
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
from generators.site_accounts import read_accounts
from generators.site_hosts import check_host_addresses_apart, read_host
from generators.site_networks import check_bridges_agree, check_subnets_apart, check_uplinks, read_network
from generators.site_values import (
    parse_name_servers,
    read_absolute_path,
    read_domain,
    read_http_url,
    read_interface_name,
    read_keyboard,
    read_locale,
    read_mirror_dir,
    read_mirror_host,
    read_mirror_proxy,
    read_timezone,
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

# sun_path holds 107 bytes; below scratch_dir goes the backup job's socket, pid_max's largest pid included.
MAX_SCRATCH_DIR = 107 - len("/kvmconf-backup-4194304-20261122T134650Z/nbd.sock")
ZONEINFO = Path("/usr/share/zoneinfo")  # the zone database a time zone is checked against, where this machine has it
XKB_RULES = Path("/usr/share/X11/xkb/rules/base.lst")  # the layouts a keyboard is checked against, likewise


def load_site(path: Path) -> Site:
    """Parse and check site.toml (and its optional secrets file); raise ConfigError listing all problems."""
    return load_site_located(path)[0]


def load_site_located(path: Path) -> tuple[Site, Locate]:
    """load_site, plus where each key is, for later problems about site.toml (e.g. provision.vm)."""
    data, text = read_toml(path, "the site settings with --site, SITE=... or KVMCONF_SITE")
    problems: list[Problem] = []
    locate = locator(str(path), text)
    top = TableReader(data, "", locate, problems, one_line=True)

    domain = read_domain(top)
    domain_type = top.convert("domain_type", DomainType, "a domain type", "kvm or qemu", default=DomainType.KVM)
    locale = read_locale(top)
    keyboard = read_keyboard(top, XKB_RULES)
    timezone = read_timezone(top, ZONEINFO)
    networks = _read_networks(top)
    hosts = _read_hosts(top, networks)
    oses = _each(top, "os", _read_os, "with family, suite, kernel, initrd, ...", "os")
    default_network = _default_name(top, "default_network", networks, "a network")
    default_os = _default_name(top, "default_os", oses, "an OS")
    provision = _read_provision(top)
    accounts = read_accounts(top, path.parent)
    backup = _read_backup(top)
    hostgroups = _read_hostgroups(top, hosts)
    top.check_unknown()
    if problems:
        raise ConfigError(problems)
    site = Site(  # the values read are not None now: a None would have been a problem
        domain=domain,  # type: ignore[arg-type]
        domain_type=domain_type,  # type: ignore[arg-type]
        locale=locale,  # type: ignore[arg-type]
        keyboard=keyboard,  # type: ignore[arg-type]
        timezone=timezone,  # type: ignore[arg-type]
        networks={k: v for k, v in networks.items() if v},
        hosts={k: v for k, v in hosts.items() if v},
        oses={k: v for k, v in oses.items() if v},
        default_network=default_network,
        default_os=default_os,
        provision=Provision(**provision),
        accounts=Accounts(**{**accounts, "ssh_keys": tuple(accounts["ssh_keys"])}),
        backup=Backup(**backup),
        hostgroups=hostgroups,
        path=str(path),
    )
    return site, locate


def _read_networks(top: TableReader) -> dict[str, Network | None]:
    """[networks.NAME], each on its own, then together: no address in two subnets, each bridge one thing."""
    networks = _each(top, "networks", read_network, "with subnet, bridge, ...", "net")
    check_subnets_apart(networks, top.locate, top.problems)
    check_bridges_agree(networks, top.locate, top.problems)
    return networks


def _read_hosts(top: TableReader, networks: dict[str, Network | None]) -> dict[str, PhysicalHost | None]:
    """[hosts.NAME], each on its own, then together: an uplink for the networks' bridges, an address of its own."""
    hosts = _each(top, "hosts", read_host, "with uri, ram_mb, cpus, disk_gb, ...", "host")
    check_uplinks(networks, hosts, top.locate, top.problems)
    check_host_addresses_apart(hosts, top.locate, top.problems)
    for host, other in host_group_clashes(hosts).items():
        TableReader({}, "hosts", top.locate, top.problems).problem(
            host, f"would share the group {group_name(f'host_{host}')!r} of ansible/inventory.ini with host {other!r}"
            " (expected a host name whose group host_<name>, each character other than a letter, digit or '_' made"
            " '_', is not another host's)")
    return hosts


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


def _default_name(top: TableReader, key: str, names: dict[str, Any], noun: str) -> str:
    """The table entry VMs get when they name none: `key` if given (it must exist, "" included), else the first."""
    value = top.get(key, str, next(iter(names), ""))
    if isinstance(value, str) and value not in names and (value or key in top.data):
        expected = ", ".join(sorted(names)) or "none defined"
        top.problem(key, f"{shown(value)} is not {noun} (expected one of: {expected})")
    return value or ""


def _read_os(name: str, r: TableReader) -> OsRelease | None:
    """One [os.NAME] table: an OS release VMs get, from its installer over PXE (Debian only) or a cloud image."""
    family = r.get("family", str, what="debian or ubuntu")
    if family is not None and family not in ("debian", "ubuntu"):
        r.problem("family", f"{shown(family)} is not an OS family (expected debian or ubuntu)")
        family = None
    suite = r.get("suite", str, what="a release codename such as bookworm")
    # Only Debian's installer boots over PXE (install=pxe); other families install from cloud images.
    required = family != "ubuntu"
    kernel = _boot_file(r, "kernel", "the installer kernel's path under the TFTP root", required)
    initrd = _boot_file(r, "initrd", "the installer initrd's path under the TFTP root", required)
    cloud_image = read_absolute_path(r, "cloud_image", None, "/var/lib/libvirt/images/base/debian-12.qcow2")
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
    if path == "" and required:  # the boot entries would say `KERNEL` with nothing after it
        r.problem(key, f"is empty (expected {what}: an OS of family debian installs over PXE with it)")
        return None
    if path and ".." in path.split("/"):
        # dnsmasq's TFTP refuses such a path, and `invoke provision-server` would copy the file outside tftp_root.
        r.problem(key, f"{shown(path)} leads out of the TFTP root (expected {what}, without '..')")
        return None
    return path


def _read_provision(top: TableReader) -> dict[str, Any]:
    """[provision]: the server that netboots and seeds the VMs, and the Debian mirror their installers use."""
    p = top.sub("provision")
    values = dict(
        vm=p.get("vm", str, None, "the name of the provision server's VM in cluster.conf"),
        server=p.convert("server", IPv4Address, "an IPv4 address", "the provision server's address a.b.c.d",
                         default=None),
        http_url=read_http_url(p),
        tftp_root=read_absolute_path(p, "tftp_root", "/srv/tftp"),
        interface=read_interface_name(p, "interface", "the interface dnsmasq serves"),
        mirror_host=read_mirror_host(p),
        mirror_dir=read_mirror_dir(p),
        mirror_proxy=read_mirror_proxy(p),
        config_dir=read_absolute_path(p, "config_dir", "/etc/kvmconf"),
        upstream_dns=p.convert("upstream_dns", _name_servers, "a list of name server addresses", UPSTREAM_DNS_RULE,
                               default=None, kind=list),
    )
    if not p.absent and ("vm" in p.data) == ("server" in p.data):
        p.problems.append(Problem(p.locate("provision", ""), "table '[provision]' needs exactly one of 'vm' (the"
                                  " provision VM's name in cluster.conf) or 'server' (its IPv4 address)"))
    p.check_unknown()
    return values


UPSTREAM_DNS_RULE = (  # what [provision] upstream_dns takes, for its problems
    '["a.b.c.d", ...]: the name servers the provision server\'s dnsmasq forwards names outside the cluster to,'
    ' or [] for none')


def _name_servers(value: list[Any]) -> tuple[IPv4Address, ...]:
    # With interface=, dnsmasq listens on lo too: port 53 there is dnsmasq itself.
    return parse_name_servers(value, UPSTREAM_DNS_RULE, "where the provision server's dnsmasq itself listens")


def _read_backup(top: TableReader) -> dict[str, Any]:
    """[backup]: when and where the hosts' cron backs the VMs' disks up, and how many it keeps."""
    b = top.sub("backup", required=False)  # every key has a default
    values = dict(
        schedule=_read_schedule(b),
        verify_schedule=_read_verify_schedule(b),
        dir=read_absolute_path(b, "dir", "/var/backups/kvmconf"),
        nas_dir=read_absolute_path(b, "nas_dir", None, "/mnt/nas/kvmconf"),
        keep=b.positive("keep", int, 1),
        full_every=b.positive("full_every", int, 7),
        log=read_absolute_path(b, "log", "/var/log/kvmconf-backup.log"),
        checkout=read_absolute_path(b, "checkout", "/root/kvmconf"),
        scratch_dir=read_absolute_path(b, "scratch_dir", "/var/tmp"),
    )
    local, nas = values["dir"], values["nas_dir"]
    if local is not None and nas is not None and (PurePosixPath(nas).is_relative_to(local)
                                                  or PurePosixPath(local).is_relative_to(nas)):
        # The NAS copy is the second place of the backups, for when the local disk is lost; one inside the other is
        # one filesystem, and the NAS stage would find its "share" never mounted.
        b.problem("nas_dir", f"{shown(nas)} is, or is nested with, [backup] dir {shown(local)} (expected the"
                  " mount point of a NAS share, outside dir)")
        values["nas_dir"] = None
    scratch = values["scratch_dir"]
    if scratch is not None and len(scratch.encode()) > MAX_SCRATCH_DIR:
        # The job's NBD socket is <scratch_dir>/kvmconf-backup-<pid>-<time>/nbd.sock: a unix socket path has at
        # most 107 bytes, and QEMU could not create the socket of a longer one.
        b.problem("scratch_dir", f"{shown(scratch)} is too long (expected at most {MAX_SCRATCH_DIR} bytes: the"
                  " backup's unix socket goes below it)")
        values["scratch_dir"] = None
    b.check_unknown()
    return values


def _read_schedule(b: TableReader, key: str = "schedule", default: str = "30 2 * * *", off: bool = False
                   ) -> str | None:
    """A cron schedule of [backup], in the forms kvmconf reads: the Nagios check's age limit comes from the
    backups' one, so it must run (at least yearly). `off`: "" is allowed too, for no cron job at all."""
    schedule: str | None = b.get(key, str, default)
    if off and schedule == "":
        return schedule
    if schedule is not None and len(schedule.split()) != 5:
        b.problem(key, f"{shown(schedule)} is not a cron schedule (expected 5 fields, e.g. '{default}')")
        return None
    if schedule is not None:
        try:
            max_interval(schedule)
        except ValueError:
            b.problem(key, f"{shown(schedule)} is not a cron schedule kvmconf reads (expected numbers, *,"
                      " ranges, lists and steps, e.g. '30 2 * * 1-5', within minute 0-59, hour 0-23, day 1-31,"
                      " month 1-12, weekday 0-7; no names such as mon)")
            return None
        if runs_in_two_years(schedule) < 2:  # the Nagios check's limit would be the whole span: never late
            b.problem(key, f"{shown(schedule)} runs at most once in two years (a day that never comes, such"
                      f" as February 31st?): expected a schedule that runs at least yearly, e.g. '{default}'")
            return None
        schedule = " ".join(schedule.split())  # as cron's file and the Nagios check's comment show it
    return schedule


def _read_verify_schedule(b: TableReader) -> str | None:
    """When cron runs `backup-verify --all` (every point read back: weekly by default); "" for never."""
    return _read_schedule(b, "verify_schedule", "30 4 * * 0", off=True)


def _read_hostgroups(top: TableReader, hosts: dict[str, PhysicalHost | None]) -> dict[str, str] | None:
    """[hostgroups]: each Nagios hostgroup's description; None when the table is absent."""
    top.used.add("hostgroups")  # an allowed key even when absent: a misspelt [hostgroup]'s message must list it
    if "hostgroups" not in top.data:
        return None
    h = top.sub("hostgroups")
    hostgroups: dict[str, str] = {}
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
    return hostgroups
