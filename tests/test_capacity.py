"""`invoke capacity` from the model: committed vs capacity and overcommit, pinned CPUs, VFs, PCI functions."""

from __future__ import annotations

from pathlib import Path

from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf.capacity import capacity, format_capacity
from kvmconf.connection import connections
from tests.test_provision import on_test_driver

FIXTURES = Path("tests/fixtures")


def test_example_hosts_show_committed_resources_against_capacity_and_overcommit(example: Cluster) -> None:
    text = format_capacity(capacity(example))
    assert text.splitlines() == [
        "kvm0 (qemu:///system): 7 VMs in cluster.conf",
        "  RAM      20480 MB  of 131072 (limit 131072 at overcommit 1: 16% used)",
        "  vCPUs       16     of 32 (limit 128 at overcommit 4: 12% used)",
        "  disk       370 GB  of 4000 (limit 8000 at overcommit 2: 5% used)",
        "  pinned CPUs: none; housekeeping CPUs: none",
        "kvm1 (qemu+ssh://root@kvm1.phys.example.org/system): 1 VM in cluster.conf",
        "  RAM      16384 MB  of 65536 (limit 65536 at overcommit 1: 25% used)",
        "  vCPUs        4     of 16 (limit 32 at overcommit 2: 12% used)",
        "  disk       100 GB  of 2000 (limit 2000 at overcommit 1: 5% used)",
        "  pinned CPUs: 4-7 (compute1); housekeeping CPUs: none",
    ]


def test_devices_pinned_cpus_used_vfs_and_passed_through_functions() -> None:
    nics = load_cluster(FIXTURES / "nics-cluster.conf", FIXTURES / "nics-site.toml")
    lines = format_capacity(capacity(nics)).splitlines()
    assert lines[4:] == [
        "  pinned CPUs: 2-3 (pinned); housekeeping CPUs: 0-1",
        "  SR-IOV VFs: eno2 1/4, eno3 2/8",
        "  PCI passthrough: 0000:1a:00.1 (passthru), 0000:1a:00.2 (passthru), 0000:3b:02.3 (vfpinned)",
    ]


def test_only_the_hosts_asked_for(example: Cluster) -> None:
    assert [h.host for h in capacity(example, hosts=["kvm1"])] == ["kvm1"]


def test_domains_cluster_conf_does_not_place_on_a_host_are_said_with_the_ram_they_run_with(
        example: Cluster, tmp_path: Path) -> None:
    """A host showed "0% used" while domains made by hand, or moved there by a migrate without --edit, ran on it."""
    cluster = on_test_driver(example, tmp_path)  # test:///default holds a running domain "test" of 8 GiB
    with connections(cluster) as conns:
        [kvm1] = capacity(cluster, conns, ["kvm1"])
    assert format_capacity([kvm1]).splitlines()[0] == (
        "kvm1 (test:///default): 1 VM in cluster.conf, 0 defined, 0 running; and 1 other domain not placed here by"
        " cluster.conf, not counted below: 1 running with 8192 MB RAM (see `invoke status`)")
