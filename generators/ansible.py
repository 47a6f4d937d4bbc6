"""ansible/inventory.ini: an INI inventory grouped by hostgroup and by physical host.

Ansible wants group names that are Python identifiers (letters, digits, '_', no leading digit), so
that `groups.web_servers` works in templates; for others it warns "Invalid characters were found in
group names". Hostgroups are nagios names like `web-servers`: :func:`group_name` maps every other
character to '_'.
Hostgroups that map to the same name, to a host_<physical host> name or to Ansible's own `all` and
`ungrouped` would share one group: site.toml's [hostgroups] or cluster.conf refuses them (:func:`group_clash`),
as site.toml refuses two physical hosts whose host_<name> groups are one (:func:`host_group_clashes`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from generators.model import Cluster, Vm
from generators.render import render as render_template
from generators.ssh_config import KNOWN_HOSTS

TEMPLATE = "inventory.ini.j2"
UNGROUPED = "ungrouped"  # ansible's own group for hosts without a group
GROUP_RULE = ("a hostgroup whose Ansible group name, with each character other than a letter, digit or '_' made '_',"
              " is not all, ungrouped, host_<physical host> or another hostgroup's")
_NOT_IN_GROUP_NAME = re.compile(r"[^A-Za-z0-9_]")


def group_name(name: str) -> str:
    """``name`` as a valid ansible group name: `web-servers` -> `web_servers`, `2nd` -> `_2nd`."""
    valid = _NOT_IN_GROUP_NAME.sub("_", name)
    return f"_{valid}" if valid[:1].isdigit() else valid


def group_clash(hostgroup: str, hosts: Iterable[str], claimed: dict[str, str]) -> str | None:
    """What else ``hostgroup``'s Ansible group would be, in words; None when nothing (it is then claimed).

    ``claimed`` maps the Ansible names of the hostgroups seen so far to those hostgroups: of two that map
    to one name, the second clashes with the first.
    """
    name = group_name(hostgroup)
    if name in ("all", UNGROUPED):
        return f"Ansible's own group {name!r}"
    host = next((host for host in sorted(hosts) if group_name(f"host_{host}") == name), None)
    if host is not None:
        return f"the group {name!r} of physical host {host!r}"
    other = claimed.setdefault(name, hostgroup)
    return None if other == hostgroup else f"the group {name!r} of hostgroup {other!r}"


def host_group_clashes(hosts: Iterable[str]) -> dict[str, str]:
    """Each physical host whose group host_<name> is an earlier host's (kvm-0 and kvm_0) -> that earlier host:
    the two would share one group, and a play on one host's VMs would reach the other's too."""
    claimed: dict[str, str] = {}
    clashes: dict[str, str] = {}
    for host in hosts:
        other = claimed.setdefault(group_name(f"host_{host}"), host)
        if other != host:
            clashes[host] = other
    return clashes


def groups(cluster: Cluster) -> list[tuple[str, list[Vm]]]:
    """(group, members in cluster.conf order): hostgroups sorted, then host_<host>.

    No [ungrouped] for the VMs without a hostgroup: Ansible's `ungrouped` holds only hosts that are in no other
    group, and every VM is in its host_<host>, so Ansible would empty the section (`ansible ungrouped` matched
    no host while the file listed some).
    """
    by_hostgroup: dict[str, list[Vm]] = {}
    for hostgroup, members in cluster.hostgroups.items():
        by_hostgroup.setdefault(group_name(hostgroup), []).extend(members)
    by_host: dict[str, list[Vm]] = {}
    for vm in cluster.vms:
        by_host.setdefault(group_name(f"host_{vm.host}"), []).append(vm)
    result: dict[str, list[Vm]] = {}
    for name, vms in [*sorted(by_hostgroup.items()), *sorted(by_host.items())]:
        if vms:
            result.setdefault(name, []).extend(vms)
    order = {vm.name: index for index, vm in enumerate(cluster.vms)}
    # Members in file order and each once, also where several hostgroups became one group.
    return [(name, sorted({vm.name: vm for vm in vms}.values(), key=lambda vm: order[vm.name]))
            for name, vms in result.items()]


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    return {PurePosixPath("ansible/inventory.ini"): render_template(
        TEMPLATE, cluster, groups=groups(cluster), known_hosts=KNOWN_HOSTS)}
