"""Starting a throwaway lab for a test module: the one way test_lab, test_backup and
test_provision_server get their private libvirtd, namespace and dnsmasq."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from generators.validate import load_cluster
from kvmconf import lab
from tests.tools import missing, require_tool

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def quiet(_line: str) -> None:
    pass


def require_lab() -> None:
    for tool in lab.TOOLS:
        require_tool(tool)
    if os.geteuid() != 0:
        missing("the lab needs root (network namespaces, libvirtd)")


def running_lab(directory: Path, netns_prefix: str, cluster_conf: Path = FIXTURES / "lab-cluster.conf",
                site_toml: Path = FIXTURES / "lab-site.toml") -> Iterator[lab.Lab]:
    """Yield a lab whose namespace is ``<prefix><pid>``; a killed earlier run's namespaces are removed first."""
    require_lab()
    lab.remove_stale_netns(netns_prefix)
    started = lab.up(load_cluster(cluster_conf, site_toml), directory, f"{netns_prefix}{os.getpid()}", log=quiet)
    yield started
    lab.teardown(started, quiet)
