"""Which cluster the tasks act on: KVMCONF_CLUSTER/KVMCONF_SITE as for `make`, plus KVMCONF_LAB for the lab.

KVMCONF_BUILD only locates the generated ssh config (:func:`generators.locations.build_dir`): provisioning
renders the domain XML and seed ISOs it needs in memory from the validated cluster, so a stale build/ can never
be provisioned.

With ``KVMCONF_LAB=<dir>`` (printed by `invoke lab.up`) every task acts on the lab in that
directory instead of the real hosts of site.toml: see :func:`kvmconf.lab.remap`.
"""

from __future__ import annotations

import os
from pathlib import Path

from generators import locations
from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf.errors import KvmconfError
from kvmconf.lab import Lab, remap
from kvmconf.processes import alive


# The variables read exactly as `make` reads them; unset, the files of the checkout, wherever the task runs from.
def cluster_path() -> Path:
    return locations.cluster_path(locations.the_checkout())


def site_path() -> Path:
    return locations.site_path(locations.the_checkout())


def lab_dir() -> Path | None:
    value = os.environ.get("KVMCONF_LAB")
    return Path(value) if value else None


def load() -> Cluster:
    """The validated cluster (raises ConfigError/UsageError), moved into the lab when KVMCONF_LAB is set."""
    cluster = load_cluster(cluster_path(), site_path())
    directory = lab_dir()
    if directory is None:
        return cluster
    lab = Lab.load(directory.absolute())
    if lab is None:
        raise KvmconfError(f"KVMCONF_LAB={directory} but no lab is up there: start it with `invoke lab.up`"
                           " (or unset KVMCONF_LAB to act on the hosts of site.toml)")
    if not alive(lab.pids.get("libvirtd", 0)):
        raise KvmconfError(f"the lab in {directory} is not running any more (its libvirtd has exited): restart it"
                           " with `invoke lab.down` and `invoke lab.up`")
    return remap(cluster, lab)
