"""site.toml's documentation agrees with the code: the example shows every key the code reads (the optional ones
commented out, with values that load), and README's table lists every key with the default the code applies."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from generators.model import Site
from generators.site import load_site
from generators.validate import load_cluster
from tests.test_site import MINIMAL_SITE, _problems, _write  # MINIMAL_SITE: only the keys without a default
from tests.tools import ROOT

EXAMPLE_SITE = (ROOT / "site.toml").read_text()
# A table of the example for each kind of table, and how README names that kind.
TABLES = {"": "", "accounts": "accounts", "networks.lan": "networks.<name>", "hosts.kvm0": "hosts.<name>",
          "os.bookworm": "os.<name>", "provision": "provision", "backup": "backup"}
SUBTABLES = {"accounts", "backup", "hostgroups", "hosts", "networks", "os", "provision"}
MINIMAL_NAMES = {"networks.<name>": "networks.lan", "hosts.<name>": "hosts.h1", "os.<name>": "os.bookworm"}


def keys_read(table: str, tmp_path: Path) -> list[str]:
    """The keys the code reads in ``table`` of the example, as its own unknown-key message lists them."""
    header = f"[{table}]\n" if table else 'domain = "phys.example.org"\n'
    assert EXAMPLE_SITE.count(header) == 1
    [message] = _problems(_write(tmp_path, EXAMPLE_SITE.replace(header, f"{header}zz_no_such_key = 1\n")))
    listed = re.fullmatch(r"\d+:\d+: key '[a-z0-9._]+': unknown key \(expected one of: ([a-z_, ]+)\)", message)
    assert listed is not None, message
    return [key for key in listed[1].split(", ") if table or key not in SUBTABLES]


@pytest.fixture(scope="module")
def documented_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """README's name of each kind of table -> the keys the code reads there."""
    tmp_path = tmp_path_factory.mktemp("keys")
    return {kind: keys_read(table, tmp_path) for table, kind in TABLES.items()}


def _sections(prefix: str) -> str:
    """The example's text of every table named ``prefix`` or ``prefix.*`` (the top level for "")."""
    parts = re.split(r"^(?=\[)", EXAMPLE_SITE, flags=re.M)
    if not prefix:
        return parts[0]
    return "".join(part for part in parts if re.match(rf"\[{re.escape(prefix)}[\].]", part))


def test_the_example_shows_every_key_the_code_reads(documented_keys: dict[str, list[str]]) -> None:
    for kind, keys in documented_keys.items():
        text = _sections(kind.removesuffix(".<name>"))
        assert keys, kind
        missing = [key for key in keys if not re.search(rf"^(# )?{key} = ", text, re.M)]
        assert missing == [], f"site.toml's [{kind}] does not show {missing}"


def _uncommented(text: str, keys: set[str], leave: set[str]) -> tuple[str, list[str]]:
    """``text`` with each commented-out `# key = value` line of a known key (except ``leave``) made a key line."""
    done: list[str] = []

    def uncomment(line: re.Match[str]) -> str:
        if line[1] in keys and line[1] not in leave:
            done.append(line[1])
            return line[0].removeprefix("# ")
        return line[0]

    return re.sub(r"^# ([a-z_]+) = .*$", uncomment, text, flags=re.M), done


def test_the_examples_commented_keys_are_valid_and_consistent_with_the_example_cluster(
        documented_keys: dict[str, list[str]], tmp_path: Path) -> None:
    keys = {key for listed in documented_keys.values() for key in listed}
    site = tmp_path / "site.toml"
    text, done = _uncommented(EXAMPLE_SITE, keys, leave={"server"})  # server is the alternative to vm
    assert sorted(done) == ["housekeeping_cpus", "interfaces", "mirror_proxy", "nested", "network_stack", "numa_nodes",
                            "ovs", "pci", "ram_overcommit", "sriov", "ssh_user", "uplink", "vlan"]
    site.write_text(text)
    cluster = load_cluster(ROOT / "cluster.conf", site)  # raises ConfigError, with every problem, if not
    kvm0 = cluster.site.hosts["kvm0"]
    assert (kvm0.uplink, kvm0.network_stack, kvm0.sriov, kvm0.numa_nodes) == ("eno1", "ifupdown", {"eno3": 4}, 2)
    assert cluster.site.networks["lan"].vlan == 50
    # The provision server given by address instead of by VM name: kvm0 itself.
    text, done = _uncommented(EXAMPLE_SITE.replace('\nvm = "provision"', '\n# vm = "provision"'), {"server"}, set())
    assert done == ["server"]
    site.write_text(text)
    assert str(load_cluster(ROOT / "cluster.conf", site).site.provision.server) == kvm0.address


def _readme_rows() -> dict[str, str]:
    """README's site.toml table: key -> its default cell."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## site.toml\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([a-z_<>.]+)` \| (.*?) \| .* \|$", section, re.M)
    assert len(rows) == len({key for key, _ in rows}), "a key is documented twice"
    return dict(rows)


def test_readme_documents_exactly_the_keys_the_code_reads(documented_keys: dict[str, list[str]]) -> None:
    expected = {f"{kind}.{key}" if kind else key for kind, keys in documented_keys.items() for key in keys}
    assert set(_readme_rows()) == expected | {"hostgroups.<group>"}


def _value(site: Site, key: str) -> Any:
    """What the loaded minimal site holds for README's key, e.g. hosts.<name>.uplink -> site.hosts["h1"].uplink."""
    *table, name = key.split(".")
    kind = ".".join(table)
    holder: Any = {"": site, "accounts": site.accounts, "provision": site.provision, "backup": site.backup,
                   "networks.<name>": site.networks["lan"], "hosts.<name>": site.hosts["h1"],
                   "os.<name>": site.oses["bookworm"]}[kind]
    return getattr(holder, {"dns": "dns_servers"}.get(name, name))


def _empty(value: Any) -> bool:
    return isinstance(value, (str, list, tuple, Mapping)) and len(value) == 0


@pytest.mark.parametrize("key", sorted(key for key, default in _readme_rows().items() if default.startswith("`")))
def test_readme_default_is_the_codes(key: str, tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL_SITE)
    documented = tomllib.loads(f"v = {re.fullmatch(r'`([^`]*)`', _readme_rows()[key])[1]}")["v"]  # type: ignore[index]
    actual = _value(load_site(path), key)
    # An empty list, table or string is how TOML says "none" for what the model keeps as a tuple or dict.
    assert actual == documented or (_empty(actual) and _empty(documented)), (key, actual, documented)


@pytest.mark.parametrize("key", sorted(key for key, default in _readme_rows().items() if default == "required"))
def test_readme_required_key_is_required(key: str, tmp_path: Path) -> None:
    *table, name = key.split(".")
    where = ".".join([MINIMAL_NAMES.get(".".join(table), ".".join(table)), name]).lstrip(".")
    header = f"[{where.rpartition('.')[0]}]\n" if table else ""
    start = MINIMAL_SITE.index(header) + len(header) if header else 0
    line = re.compile(rf"^{name} = .*\n", re.M).search(MINIMAL_SITE, start)
    assert line is not None, key
    without = MINIMAL_SITE[:line.start()] + MINIMAL_SITE[line.end():]
    assert f"key '{where}' is missing" in " ".join(_problems(_write(tmp_path, without)))
