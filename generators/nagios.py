"""Nagios 4 objects for every VM: build/nagios/{hostgroups,hosts,services,contacts}.cfg.

The files use only what Debian's nagios4 packages define in their stock nagios.cfg: the commands
check-host-alive, check_ping, check_ssh (monitoring-plugins, /etc/nagios-plugins/config),
notify-host-by-email and notify-service-by-email (/etc/nagios4/objects/commands.cfg) and the
timeperiod 24x7 (/etc/nagios4/objects/timeperiods.cfg). Templates, contact and contactgroup are
our own, prefixed `kvmconf-`, so they never clash with Debian's generic-host, admins, ... .

One clash remains with the stock config: Debian's objects/localhost.cfg defines the hostgroup
`linux-servers`, so a cluster.conf using that group needs localhost.cfg dropped from nagios.cfg
(Nagios refuses a duplicate hostgroup). tests/test_nagios.py checks both setups with `nagios4 -v`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from generators.crontab import GRACE, max_interval
from generators.model import Cluster
from generators.render import render as render_template

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


def backup_check(cluster: Cluster) -> dict[str, object]:
    """What backup.cfg needs: each backed-up VM with the address of its physical host (where its backups are)."""
    backup = cluster.site.backup
    limit = max_interval(backup.schedule) + GRACE
    hours = limit.total_seconds() / 3600
    return {
        "covered": [(vm.name, cluster.site.hosts[vm.host].address or vm.host) for vm in cluster.vms if vm.backup],
        "checkout": shlex.quote(backup.checkout),
        "schedule": " ".join(backup.schedule.split()),
        "limit": f"{hours:g} h",
    }


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    groups = hostgroups(cluster)
    check = backup_check(cluster)
    return {
        PurePosixPath("nagios", name): render_template(template, cluster, groups=groups, **check)
        for name, template in TEMPLATES.items()
    }
