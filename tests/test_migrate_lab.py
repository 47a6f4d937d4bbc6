"""`invoke migrate` of a VM whose line in cluster.conf changed since it was provisioned, on the lab's real libvirtd
daemons (one per host) and QEMU.

The lab, its fixtures' cluster and the way tasks are run are test_lab's; this module starts a lab of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmconf import lab
from kvmconf.disks import GIB
from tests import test_lab
from tests.labs import running_lab
from tests.test_lab import domains_on, invoke, lab_domain
from tests.test_provision_lab import edit_vm_line

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-mlabtest-"  # + the pytest PID: a killed run's namespaces are removed by the next run


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)


clean = test_lab.clean
workdir = test_lab.workdir


def test_a_live_migration_keeps_the_disk_size_the_vm_has_when_cluster_conf_says_another(
        workdir: Path, clean: lab.Lab) -> None:
    """A size raised in cluster.conf is never applied to a disk (provision says so): the target's disk was made at
    cluster.conf's size all the same, and libvirt refused to mirror into it ("Source and target image have
    different sizes"), so a running VM whose size had been raised could not move live."""
    assert invoke(workdir, clean, "provision", "--vm", "web").returncode == 0  # 1 GB, running
    edit_vm_line(workdir, "web", 4, "1", "3")
    moved = invoke(workdir, clean, "migrate", "--vm", "web", "--to", "kvm1")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.splitlines()[:2] == ["web: migrating live to kvm1 (memory and disk) ...",
                                             "web: running on kvm1"]
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["web"])
    with lab_domain(clean, "kvm1", "web") as dom:
        assert dom.isActive() and dom.blockInfo("vda")[0] == GIB  # as it was: still not resized
