"""Good input: what cluster.conf lines become, placement of host=auto VMs, the repository's own files."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from generators.columns import (
    COLUMNS,
    MAX_INT,
    OPTIONS,
    FieldError,
    markdown_tables,
    parse_after,
    parse_hostgroups,
    parse_positive,
)
from generators.inventory import read_rows
from generators.model import Boot, Cluster, Disk, DiskKind, Install
from generators.validate import load_cluster
from tests.tools import ROOT

EXAMPLE_CONF = (ROOT / "cluster.conf").read_text()
EXAMPLE_SITE = (ROOT / "site.toml").read_text()


def _load(tmp_path: Path, conf: str | bytes, site: str = EXAMPLE_SITE) -> Cluster:
    (tmp_path / "cluster.conf").write_bytes(conf.encode() if isinstance(conf, str) else conf)
    (tmp_path / "site.toml").write_text(site)
    return load_cluster(tmp_path / "cluster.conf", tmp_path / "site.toml")


def test_the_repository_files_parse() -> None:
    cluster = load_cluster(ROOT / "cluster.conf", ROOT / "site.toml")
    assert [vm.name for vm in cluster.vms] == ["provision", "mcp", "ldap", "db", "web", "login", "compute1", "scratch"]
    assert [vm.line for vm in cluster.vms] == list(range(4, 12))
    assert cluster.site.provision.server == IPv4Address("192.168.50.2")  # from [provision] vm = "provision"
    compute1 = cluster.vm("compute1")
    assert compute1.cpuset == (4, 5, 6, 7) and compute1.disk == Disk(DiskKind.LVM, 100, "vg0")
    assert (compute1.host, compute1.auto_placed) == ("kvm1", False)
    login = cluster.vm("login")
    assert (login.network, login.install, login.host, login.auto_placed) == ("dmz", Install.CLOUD, "kvm0", True)
    scratch = cluster.vm("scratch")
    assert (scratch.hostgroups, scratch.backup, scratch.autostart, scratch.install) == ((), False, False, Install.NONE)
    assert cluster.vm("db").keep == 4 and cluster.vm("web").boot is Boot.UEFI
    assert cluster.vm("web").after == ("db",) and cluster.vm("provision").after == ()


def test_crlf_bom_and_comments_give_the_same_cluster(tmp_path: Path) -> None:
    plain = _load(tmp_path, EXAMPLE_CONF)
    messy = "\ufeff" + EXAMPLE_CONF.replace("\n", "\r\n").replace("\r\nmcp", "\r\n\r\n   # a comment\r\n\t\r\nmcp")
    (tmp_path / "b").mkdir()
    again = _load(tmp_path / "b", messy)
    assert [vm.name for vm in again.vms] == [vm.name for vm in plain.vms]
    assert [(vm.mac, vm.ip, vm.ram_mb, vm.host, vm.cpuset) for vm in again.vms] == [
        (vm.mac, vm.ip, vm.ram_mb, vm.host, vm.cpuset) for vm in plain.vms]


LINE = "new\t52:54:00:50:00:99\t192.168.50.99\t1024\t10\t1\t{groups}\t{options}"


@pytest.mark.parametrize(("options", "attribute", "value"), [
    ("", "host", "kvm0"),
    ("host=kvm1", "host", "kvm1"),
    ("host=auto", "auto_placed", True),
    ("host=kvm1", "install", Install.PXE),
    ("host=kvm1 install=none", "install", Install.NONE),
    ("host=kvm1 disk=raw", "disk", Disk(DiskKind.RAW, 10)),
    ("host=kvm1 disk=lvm:vg_data-1", "disk", Disk(DiskKind.LVM, 10, "vg_data-1")),
    ("host=kvm1 net=dmz", "network", "dmz"),
    ("host=kvm1", "network", "lan"),
    ("host=kvm1", "os", "bookworm"),
    ("host=kvm1 boot=uefi", "boot", Boot.UEFI),
    ("host=kvm1 cpuset=9", "cpuset", (9,)),
    ("host=kvm1 after=provision,db", "after", ("provision", "db")),
    ("host=kvm1 autostart=off", "autostart", False),
    ("host=kvm1 backup=0", "backup", False),
    ("host=kvm1 keep=12", "keep", 12),
    ("host=kvm1   keep=12  ", "keep", 12),  # several spaces between options are fine
])
def test_options(options: str, attribute: str, value: object, tmp_path: Path) -> None:
    net = "192.168.60.99" if "net=dmz" in options else "192.168.50.99"
    line = LINE.format(groups="-", options=options).replace("192.168.50.99", net)
    vm = _load(tmp_path, EXAMPLE_CONF + line + "\n").vm("new")
    assert getattr(vm, attribute) == value


def test_cpuset_order_is_kept(tmp_path: Path) -> None:
    """vCPU i is pinned to the i-th CPU listed, so 10,8-9 is not the same as 8-10."""
    line = LINE.format(groups="-", options="host=kvm1 cpuset=10,8-9").replace("\t1\t-", "\t3\t-")
    assert _load(tmp_path, EXAMPLE_CONF + line + "\n").vm("new").cpuset == (10, 8, 9)


@pytest.mark.parametrize(("groups", "expected"), [
    ("-", ()), ("", ()), ("compute", ("compute",)), ("web-servers,compute", ("web-servers", "compute")),
])
def test_hostgroups(groups: str, expected: tuple[str, ...], tmp_path: Path) -> None:
    line = LINE.format(groups=groups, options="host=kvm1")
    assert _load(tmp_path, EXAMPLE_CONF + line + "\n").vm("new").hostgroups == expected


def test_options_column_may_be_left_out_or_empty(tmp_path: Path) -> None:
    line = LINE.format(groups="-", options="")
    cluster = _load(tmp_path, EXAMPLE_CONF + line + "\n" + line.rstrip("\t").replace("new", "nxt", 1)
                    .replace(":99", ":98").replace(".99", ".98") + "\n")
    assert cluster.vm("new").host == cluster.vm("nxt").host == "kvm0"


def test_mac_is_stored_in_lower_case(tmp_path: Path) -> None:
    line = LINE.format(groups="-", options="host=kvm1").replace("52:54:00:50:00:99", "52:54:00:AB:CD:EF")
    assert _load(tmp_path, EXAMPLE_CONF + line + "\n").vm("new").mac == "52:54:00:ab:cd:ef"


def test_without_hostgroups_table_any_hostgroup_is_accepted(tmp_path: Path) -> None:
    site = EXAMPLE_SITE[:EXAMPLE_SITE.index("[hostgroups]")]
    line = LINE.format(groups="anything,else", options="host=kvm1")
    assert _load(tmp_path, EXAMPLE_CONF + line + "\n", site).vm("new").hostgroups == ("anything", "else")


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("0042", 42), (str(MAX_INT), MAX_INT)])
def test_positive_integers(text: str, value: int) -> None:
    assert parse_positive(text) == value


@pytest.mark.parametrize("text", ["0", "000", "", "+1", "1e3", " 1", "١", str(MAX_INT + 1)])
def test_not_positive_integers(text: str) -> None:
    with pytest.raises(FieldError, match=r"^is (not a positive integer|too large) \(expected "):
        parse_positive(text)


def test_the_cpus_column_takes_up_to_max_vcpus() -> None:
    cpus = next(column for column in COLUMNS if column.name == "cpus")
    assert cpus.parse("288") == 288  # the most QEMU 7.2's q35 takes, as virsh domcapabilities reports it
    with pytest.raises(FieldError, match=r"^is too large \(expected a vCPU count, e.g. 2, at most 288\)$"):
        cpus.parse("289")


# --- placement of host=auto VMs --------------------------------------------------------------------

SITE_TWO_HOSTS = EXAMPLE_SITE[:EXAMPLE_SITE.index("[hosts.kvm0]")] + """\
[hosts.b]
uri = "qemu:///system"
ram_mb = 8000
cpus = 8
disk_gb = 1000

[hosts.a]
uri = "qemu:///system"
ram_mb = 8000
cpus = 8
disk_gb = 1000

""" + EXAMPLE_SITE[EXAMPLE_SITE.index("[os.bookworm]"):]


def _vms(*specs: tuple[str, int, str] | tuple[str, int, str, int]) -> str:
    """Lines for (name, ram, options[, disk]), each with its own MAC and IP; the provision VM first."""
    lines = ["provision\t52:54:00:50:00:02\t192.168.50.2\t1000\t10\t1\t-\thost=a install=cloud"]
    for number, (name, ram, options, *disk) in enumerate(specs, 10):
        lines.append(f"{name}\t52:54:00:50:00:{number}\t192.168.50.{number}\t{ram}\t{disk[0] if disk else 10}\t1\t-"
                     f"\t{options}")
    return "\n".join(lines) + "\n"


def test_auto_goes_to_the_host_with_most_free_ram(tmp_path: Path) -> None:
    cluster = _load(tmp_path, _vms(("v1", 1000, ""), ("v2", 1000, ""), ("v3", 1000, "")), SITE_TWO_HOSTS)
    # a has the provision VM, so b is freer; then they are level and the tie goes to a (by name)
    assert [vm.host for vm in cluster.vms] == ["a", "b", "a", "b"]
    assert [vm.auto_placed for vm in cluster.vms] == [False, True, True, True]


def test_auto_skips_a_host_without_room(tmp_path: Path) -> None:
    # b has the most free RAM but only 5 GB of disk left
    cluster = _load(tmp_path, _vms(("filler", 10, "host=b", 995), ("v1", 1000, "", 20), ("v2", 1000, "", 5)),
                    SITE_TWO_HOSTS)
    assert [vm.host for vm in cluster.vms] == ["a", "b", "a", "b"]


def test_appending_a_vm_never_moves_one_placed_before(tmp_path: Path) -> None:
    before = _load(tmp_path, _vms(("v1", 1000, ""), ("v2", 1000, "")), SITE_TWO_HOSTS)
    (tmp_path / "more").mkdir()
    # a big VM pinned to b at the end: placing it first would send v1 to a
    after = _load(tmp_path / "more", _vms(("v1", 1000, ""), ("v2", 1000, ""), ("big", 5000, "host=b")),
                  SITE_TWO_HOSTS)
    assert [vm.host for vm in after.vms[:3]] == [vm.host for vm in before.vms] == ["a", "b", "a"]


# --- the column table drives the docs -----------------------------------------------------------------

def test_markdown_tables_list_every_column_and_option() -> None:
    tables = markdown_tables()
    for number, column in enumerate(COLUMNS, 1):
        assert f"| {number} | {column.name} | {column.meaning} | {column.rules} |" in tables
    for option in OPTIONS:
        assert f"| `{option.key}=` | {option.values} | {option.default} |" in tables


@pytest.mark.parametrize(("parse", "names"), [(parse_hostgroups, "g"), (parse_after, "vm")],
                         ids=["hostgroups", "after"])
def test_a_long_comma_list_is_read_in_linear_time(parse: Callable[[str], tuple[str, ...]], names: str) -> None:
    """Each name was looked up among all before it: a pasted list of 100,000 names took minutes to refuse."""
    many = [f"{names}{number}" for number in range(100_000)]
    start = time.monotonic()
    assert parse(",".join(many)) == tuple(many)
    with pytest.raises(FieldError, match=f"names? .*'{names}99999' twice"):
        parse(",".join([*many, many[-1]]))
    assert time.monotonic() - start < 10  # about 0.1 s; the quadratic check took over a minute


def test_a_line_with_many_repeated_options_is_read_in_linear_time(tmp_path: Path) -> None:
    """Each nic= rebuilt the tuple of those before it: 100,000 of them on a line took over a minute to read."""
    nics = " ".join(f"nic=bridge:lan/52:54:{number >> 16:02x}:{(number >> 8) & 255:02x}:{number & 255:02x}:01"
                    for number in range(100_000))
    conf = tmp_path / "cluster.conf"
    conf.write_text(f"new\t52:54:00:50:00:99\t192.168.50.99\t1024\t10\t1\t-\thost=kvm1 {nics}\n")
    start = time.monotonic()
    (row,), problems = read_rows(conf)
    assert problems == [] and len(row.options["nic"]) == len(row.repeat_cols["nic"]) == 100_000
    assert row.options["nic"][-1].mac == "52:54:01:86:9f:01"
    assert time.monotonic() - start < 10  # about half a second
