"""`invoke capacity` from the model: committed vs capacity and overcommit, pinned CPUs, VFs, PCI functions."""

from __future__ import annotations

from pathlib import Path

from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf.capacity import capacity, format_capacity

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
