"""Starting a throwaway lab for a test module: the one way test_lab, test_backup and
test_provision_server get their private libvirtd, namespace and dnsmasq; and another tool's job on a
lab VM, which backups and migrations must leave alone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

from generators.validate import load_cluster
from kvmconf import jobs, lab
from kvmconf.backup.libvirt_xml import backup_xml, domain_disks, qemu_owner
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


def start_another_tools_backup(dom: libvirt.virDomain, tmp_path: Path) -> Path:
    """A pull backup job that is not ours (another tool's, as virtnbdbackup's); its directory."""
    xml = dom.XMLDesc(0)
    disks, skipped = domain_disks(xml)
    other = tmp_path / "other-tool"  # its socket and scratch files, writable by QEMU's user
    other.mkdir()
    owner = qemu_owner(xml)
    if owner is not None:
        os.chown(other, *owner)
    dom.backupBegin(backup_xml(other / "nbd.sock", other, disks, skipped, None), None, 0)
    return other


@contextmanager
def another_tools_backup_running(dom: libvirt.virDomain, tmp_path: Path, start: bool = True) -> Iterator[Path]:
    """Inside, another tool's pull job runs on the VM (``start=False``: the test starts it); ended after, settled.

    Yields the socket it exports on."""
    try:
        yield start_another_tools_backup(dom, tmp_path) / "nbd.sock" if start else tmp_path / "other-tool/nbd.sock"
    finally:
        dom.abortJob()
        jobs.wait_until_ended(dom, 60.0)
