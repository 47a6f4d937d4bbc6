"""Nagios 4 objects for every VM: build/nagios/{hostgroups,hosts,services,contacts,backup}.cfg.

The files use only what Debian's nagios4 packages define in their stock nagios.cfg: the commands
check-host-alive, check_ping, check_ssh (monitoring-plugins-basic, /etc/nagios-plugins/config),
notify-host-by-email and notify-service-by-email (/etc/nagios4/objects/commands.cfg) and the
timeperiod 24x7 (/etc/nagios4/objects/timeperiods.cfg). Templates, contact, contactgroup and the
backup check's command are our own, prefixed `kvmconf-`, so they never clash with Debian's
generic-host, admins, ... ; that command runs monitoring-plugins-basic's check_by_ssh
(tests/test_nagios_backup_check.py runs it in a real nagios4, against a loopback sshd).

One clash remains with the stock config: Debian's objects/localhost.cfg defines the hostgroup
`linux-servers`, so a cluster.conf using that group needs localhost.cfg dropped from nagios.cfg
(Nagios refuses a duplicate hostgroup). tests/test_nagios.py checks both setups with `nagios4 -v`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import PurePosixPath

from generators.crontab import GRACE, max_interval
from generators.dnsmasq import dns_servers
from generators.errors import ConfigError, Location, Problem
from generators.host_records import host_records
from generators.model import Cluster, PhysicalHost
from generators.render import render as render_template
from generators.site_values import is_host_address

TEMPLATES = {
    "hostgroups.cfg": "nagios-hostgroups.cfg.j2",
    "hosts.cfg": "nagios-hosts.cfg.j2",
    "services.cfg": "nagios-services.cfg.j2",
    "contacts.cfg": "nagios-contacts.cfg.j2",
    "backup.cfg": "nagios-backup.cfg.j2",
}


@dataclass(frozen=True)
class Hostgroup:
    name: str
    alias: str


def object_value(text: str) -> str:
    """Free text (a site.toml alias) as one Nagios directive value.

    `;` starts a comment in Nagios object files unless escaped as `\\;`, and a value ends at the
    line's end, so line breaks become spaces (Nagios trims and keeps inner spaces as they are).
    A backslash ending a line continues it onto the next (the closing brace would be swallowed);
    Nagios reads a doubled one there as one backslash that ends the line (mmap_fgets_multiline in
    nagioscore's common/shared.c), so the value's last backslash is doubled.
    """
    value = " ".join(text.split()).replace(";", "\\;")
    return value + "\\" if value.endswith("\\") else value


def hostgroups(cluster: Cluster) -> list[Hostgroup]:
    """Every hostgroup used in cluster.conf, sorted by name, with its alias from site.toml."""
    # A blank alias would be a directive without a value, which Nagios rejects: use the name then.
    return [Hostgroup(name, object_value(cluster.hostgroup_alias(name)) or name) for name in cluster.hostgroups]


def _only_our_dnsmasq(cluster: Cluster) -> bool:
    """Whether every VM network hands out the provision server (the cluster's dnsmasq) as its only name server."""
    server = (cluster.site.provision.server,)
    return all(dns_servers(cluster, cluster.site.networks[net]) == server for net in {vm.network for vm in cluster.vms})


def _unresolvable(cluster: Cluster, address: str) -> str | None:
    """Why the VMs cannot resolve ``address``, when the cluster's dnsmasq is their only name server; else None.

    dnsmasq.conf has local=/<domain>/ (the domain is answered from dnsmasq/hosts alone, never
    forwarded) and domain-needed (a name without a dot is never forwarded). dnsmasq/hosts has the VMs
    and the physical hosts whose address is an IP (generators/host_records.py), by name and FQDN.
    """
    try:
        ip_address(address)
        return None
    except ValueError:
        pass
    if not _only_our_dnsmasq(cluster):
        return None  # some VMs ask other name servers, which may well know the host
    name, domain = address.lower(), cluster.site.domain
    if any(name in (record.name, record.fqdn) for record in host_records(cluster)):
        return None  # dnsmasq/hosts has it: the name of a host whose address is an IP (another host, then)
    if "." not in name:
        return "forwards no name without a dot"
    if name == domain or name.endswith(f".{domain}"):
        return f"answers {domain} only with cluster.conf's VMs and the hosts whose address is an IP"
    return None


def _unreachable(cluster: Cluster, host: PhysicalHost, vms: list[str]) -> Problem:
    """The problem of a host whose VMs' backups Nagios checks over SSH, with no address the Nagios VM can use."""
    names = ", ".join(vms[:3]) + (", ..." if len(vms) > 3 else "")
    check = (f"the Nagios backup check of its {len(vms)} backed-up VM{'s' * (len(vms) != 1)} ({names}) reaches the"
             " host over SSH")
    address = host.ssh_address
    names_allowed = f"a DNS name outside {cluster.site.domain}" if _only_our_dnsmasq(cluster) else "a DNS name"
    expected = f"expected address = \"IP\" of the host, or {names_allowed}, or backup=no on those VMs"
    if address is None:
        message = f"needs an address: {check}, and its uri {host.uri!r} names no host ({expected})"
    elif not is_host_address(address):  # only a URI's host can be such: site.toml refuses such an address
        message = (f"needs an address: {check}, and its uri {host.uri!r} names host {address!r}, which is not an IP"
                   f" address or DNS name (an ssh config alias?) ({expected})")
    else:
        source = "its address" if host.address else "its uri's host"
        message = (f"needs an address the VMs can resolve: {check} at {address!r} ({source}), and the VMs' only"
                   f" name server, the cluster's dnsmasq, {_unresolvable(cluster, address)} ({expected})")
    # At the key at fault: the address, else the uri whose host stood in for it, else (neither names a host) the table.
    key = "address" if host.address else "uri" if address is not None else ""
    if where := host.where_key.get(key):
        return Problem(where, f"key 'hosts.{host.name}.{key}': host {host.name!r} {message}")
    return Problem(host.where or Location(cluster.site.path), f"table '[hosts.{host.name}]' {message}")


def backup_targets(cluster: Cluster) -> list[tuple[str, str, int]]:
    """Each backed-up VM with the SSH address and port of its physical host (where its backups are).

    The check runs on the Nagios VM, so the address must be one it resolves: a host with none, or with
    a name the cluster's dnsmasq cannot answer, is a ConfigError naming its site.toml table.
    """
    # A URI's host reaches check_by_ssh's command line only if it is an IP address or DNS name: libvirt also takes
    # an ssh config alias there (kvm_1), which the Nagios VM does not know, and anything else a shell would split.
    reachable = {name: address for name, host in cluster.site.hosts.items()
                 if (address := host.ssh_address) is not None and is_host_address(address)
                 and _unresolvable(cluster, address) is None}
    backed_up = [vm for vm in cluster.vms if vm.backup]
    unreachable: dict[str, list[str]] = {}
    for vm in backed_up:
        if vm.host not in reachable:
            unreachable.setdefault(vm.host, []).append(vm.name)
    if unreachable:
        raise ConfigError([_unreachable(cluster, cluster.site.hosts[name], vms) for name, vms in unreachable.items()])
    return [(vm.name, reachable[vm.host], cluster.site.hosts[vm.host].ssh_port) for vm in backed_up]


def remote_command(checkout: str) -> str:
    """check_by_ssh's -C for the backup check: the command the host's shell runs, written as one word of a Nagios
    command_line.

    Four readers take it apart in turn: Nagios's object parser (`;` starts a comment unless escaped as `\\;`), its
    macro processor (`$$` is a `$`; the `$HOSTNAME$` at the end is the VM), the Nagios server's /bin/sh (one
    single-quoted word) and the host's shell (the checkout quoted once more). A `cd` that fails exits 1 or 2, which
    check_by_ssh passes on as WARNING or CRITICAL: `|| exit 3` makes a checkout that is not there UNKNOWN.
    """
    command = f"cd {shlex.quote(checkout)} || exit 3 && .venv/bin/invoke backup-status --nagios --vm "
    in_quotes = command.replace("'", "'\\''").replace("$", "$$").replace(";", "\\;")
    return f"'{in_quotes}$HOSTNAME$'"


def backup_check(cluster: Cluster) -> dict[str, object]:
    """What backup.cfg needs: the targets, and how the check runs and judges."""
    backup = cluster.site.backup
    limit = max_interval(backup.schedule) + GRACE
    hours = limit.total_seconds() / 3600
    return {
        "covered": backup_targets(cluster),
        "remote_command": remote_command(backup.checkout),
        "schedule": backup.schedule,
        "limit": f"{hours:g} h",
    }


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    groups = hostgroups(cluster)
    check = backup_check(cluster)
    return {
        PurePosixPath("nagios", name): render_template(template, cluster, groups=groups, **check)
        for name, template in TEMPLATES.items()
    }
