"""ansible/inventory.ini: golden file, and an INI reading that finds every VM in each of its groups."""

from __future__ import annotations

import ast
import configparser
import json
import re
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from generators import ansible
from generators.model import Cluster
from tests.golden import assert_golden
from tests.tools import require_tool, run

# ansible/inventory/group.py: a group name is invalid where this matches (C.INVALID_VARIABLE_NAMES).
ANSIBLE_INVALID_NAME = re.compile(r"^[\d\W]|[^\w]")


def inventory(cluster: Cluster) -> configparser.ConfigParser:
    """The inventory read like ansible's INI plugin does: `[group]`, host lines `name key=value ...`."""
    parser = configparser.ConfigParser(delimiters=(" ",), allow_no_value=True, interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # host names are case-sensitive
    parser.read_string(str(ansible.render(cluster)[PurePosixPath("ansible/inventory.ini")]))
    return parser


def host_vars(parser: configparser.ConfigParser, group: str) -> dict[str, dict[str, str]]:
    hosts = {}
    for host, rest in parser.items(group):
        hosts[host] = dict(word.split("=", 1) for word in (rest or "").split())
    return hosts


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("ansible", ansible.render(example), regenerate)


def test_every_vm_is_in_its_hostgroups_and_host_group(example: Cluster) -> None:
    parser = inventory(example)
    groups = [section for section in parser.sections() if section != "all:vars"]
    assert all(not ANSIBLE_INVALID_NAME.search(group) for group in groups), groups
    members = {group: host_vars(parser, group) for group in groups}
    for vm in example.vms:
        expected = {hostgroup.replace("-", "_") for hostgroup in vm.hostgroups} | {f"host_{vm.host}"}
        found = {group for group, hosts in members.items() if vm.name in hosts}
        assert found == expected, vm.name
        assert all(members[group][vm.name] == {"ansible_host": str(vm.ip)} for group in found)
    assert list(members["host_kvm1"]) == ["compute1"]
    assert list(members["host_kvm0"])[-1] == "scratch"  # no hostgroup: in its host's group alone
    assert "ungrouped" not in members  # Ansible's own group, which it empties (see the test with ansible-inventory)
    assert list(members["infrastructure"]) == ["provision", "mcp", "ldap"]  # cluster.conf order


def group_vars(parser: configparser.ConfigParser, section: str) -> dict[str, object]:
    """A `[group:vars]` section as ansible reads it: `key=value` lines, values through literal_eval."""
    variables: dict[str, object] = {}
    for first, rest in parser.items(section):  # split at the first blank by our parser: join it back
        key, _, value = (first if rest is None else f"{first} {rest}").partition("=")
        try:
            variables[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            variables[key.strip()] = value.strip()
    return variables


def test_all_vars_give_the_ssh_user_and_known_hosts(example: Cluster) -> None:
    assert group_vars(inventory(example), "all:vars") == {
        "ansible_user": "root", "ansible_ssh_common_args": "-o UserKnownHostsFile=~/.ssh/kvmconf_known_hosts"}


def test_group_names_are_valid_for_ansible() -> None:
    assert ansible.group_name("web-servers") == "web_servers"
    assert ansible.group_name("site.b-2") == "site_b_2"
    assert ansible.group_name("2nd-floor") == "_2nd_floor"
    for name in ("web-servers", "site.b-2", "2nd-floor", "host_kvm-0"):
        assert not ANSIBLE_INVALID_NAME.search(ansible.group_name(name))


def test_hostgroups_that_map_to_one_name_share_a_group(example: Cluster) -> None:
    renamed = replace(example, vms=tuple(replace(vm, hostgroups=("web_servers",)) if vm.name == "db" else vm
                                         for vm in example.vms))
    assert list(host_vars(inventory(renamed), "web_servers")) == ["db", "web"]


def ansible_inventory() -> str:
    """ansible-inventory (package ansible-core), in the venv beside this Python or on PATH."""
    beside = Path(sys.executable).parent / "ansible-inventory"
    return str(beside) if beside.is_file() else require_tool("ansible-inventory")


@pytest.mark.consumer
def test_ansible_sees_every_group_as_the_file_lists_it(example: Cluster, tmp_path: Path) -> None:
    """The VMs without a hostgroup were listed under [ungrouped], which Ansible empties of every host that is in
    another group (each VM is in its host_<host>): `ansible ungrouped` matched none of them."""
    ini = tmp_path / "inventory.ini"
    ini.write_text(str(ansible.render(example)[PurePosixPath("ansible/inventory.ini")]))
    home = tmp_path / "home"  # ansible writes ~/.ansible: not the user's
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "ANSIBLE_NOCOLOR": "1"}
    result = run([ansible_inventory(), "-i", str(ini), "--list"], env=env, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")  # no warning: no invalid group name, no group named as a host
    seen = json.loads(result.stdout)
    listed = {group: list(host_vars(inventory(example), group)) for group in inventory(example).sections()
              if group != "all:vars"}
    assert {group: seen.get(group, {}).get("hosts", []) for group in listed} == listed
    assert sorted(seen["all"]["children"]) == sorted([*listed, "ungrouped"])
    assert seen.get("ungrouped", {}).get("hosts", []) == []
    assert seen["_meta"]["hostvars"]["scratch"] == {
        "ansible_host": "192.168.50.102", "ansible_user": "root",
        "ansible_ssh_common_args": "-o UserKnownHostsFile=~/.ssh/kvmconf_known_hosts"}
