"""A cold migration's disk copy between hosts over real SSH: thin stays thin, and the copy shows its progress.

The hosts reached over SSH are real sshds on 127.0.0.x, each chrooted into an overlay of this machine's / (the
deploy tests' farm, tests/sshfarm.py): every command of the migration (the checks, the copy, the clean-up) runs
through ssh for real. Their libvirt is stood in for by test-driver instances on this machine, because no
libvirtd runs inside a farm root; the copy, which is what is tested here, never asks libvirt.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import libvirt
import pytest

from generators.model import Cluster
from kvmconf import domains
from kvmconf.connection import Opener, connections
from kvmconf.migrate import MigrationFailed, migrate
from kvmconf.plan import Artifacts
from tests import sshfarm
from tests.tools import missing, require_tool

pytestmark = [pytest.mark.services, pytest.mark.slow]

HOSTS = ("kvm0", "kvm1")
APPARENT = 200 << 20  # the thin disk's size; the farm's roots share a 512 MiB tmpfs
DATA_AT, DATA = 100 << 20, 20 << 20  # what the guest wrote: more than one progress step (16 MiB)
INSIDE = "/etc/kvmconf-test"  # in kvm0's root: what its own ssh needs to reach kvm1


@pytest.fixture(scope="module")
def farm() -> Iterator[sshfarm.Farm]:
    require_tool("sshd")
    if os.geteuid() != 0:
        missing("the sshd farm needs root (mounts, chroots)")
    started = sshfarm.start(list(HOSTS), tag="-migrate")
    try:
        _ssh_for_kvm0(started)
        yield started
    finally:
        sshfarm.teardown(started.base)


def _ssh_for_kvm0(farm: sshfarm.Farm) -> None:
    """Host to host, kvm0 pushes to kvm1 with its own ssh: give it the farm's key and kvm1's address, as an admin
    gives a host SSH access to another."""
    root = farm.root("kvm0")
    (root / INSIDE.lstrip("/")).mkdir(parents=True)
    key = root / INSIDE.lstrip("/") / "client_key"
    shutil.copyfile(farm.base / "client_key", key)
    key.chmod(0o600)
    address, port = farm.addresses["kvm1"]
    (root / INSIDE.lstrip("/") / "ssh_config").write_text(
        f"Host kvm1\n    HostName {address}\n    Port {port}\n    User root\n    IdentityFile {INSIDE}/client_key\n"
        f"    IdentitiesOnly yes\n    UserKnownHostsFile {INSIDE}/known_hosts\n    StrictHostKeyChecking accept-new\n")
    _ssh_wrapper(root / "usr/local/bin", f"{INSIDE}/ssh_config")


def _ssh_wrapper(directory: Path, config: str) -> None:
    """`ssh` first on PATH: the real one with the farm's names and keys (kvmconf runs plain `ssh HOST`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {config} -o StrictHostKeyChecking=accept-new'
                                   ' "$@"\n')
    (directory / "ssh").chmod(0o755)


def _cluster(example: Cluster, tmp_path: Path, remote: tuple[str, ...]) -> Cluster:
    hosts = {}
    for name, host in example.site.hosts.items():
        uri = f"qemu+ssh://{name}/system" if name in remote else f"test://{tmp_path}/{name}.xml"
        hosts[name] = dataclasses.replace(host, uri=uri, disk_dir=str(tmp_path / name))
    return dataclasses.replace(example, site=dataclasses.replace(example.site, hosts=hosts))


def _test_driver(tmp_path: Path) -> Opener:
    def open_uri(uri: str) -> libvirt.virConnect:
        host = urlsplit(uri).hostname if uri.startswith("qemu+ssh:") else Path(urlsplit(uri).path).stem
        return libvirt.open(f"test://{tmp_path}/{host}.xml")
    return open_uri


@pytest.mark.parametrize("remote", [("kvm0",), ("kvm1",), ("kvm0", "kvm1"), ()],
                         ids=["from-ssh", "to-ssh", "ssh-to-ssh", "local"])
def test_a_thin_disk_stays_thin_on_the_target_and_its_copy_shows_progress(
        example: Cluster, farm: sshfarm.Farm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        remote: tuple[str, ...]) -> None:
    cluster = _cluster(example, tmp_path, remote)
    _ssh_wrapper(tmp_path / "bin", str(farm.ssh_config))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    def seen(host: str, path: str) -> Path:
        """``path`` on ``host``, as this machine reaches it: through the farm root of a host reached by ssh."""
        return farm.root(host) / path.lstrip("/") if host in remote else Path(path)

    for host in HOSTS:
        (tmp_path / f"{host}.xml").write_text("<node/>\n")
        seen(host, str(tmp_path / host)).mkdir(parents=True, exist_ok=True)
    source, target = seen("kvm0", str(tmp_path / "kvm0/db.img")), seen("kvm1", str(tmp_path / "kvm1/db.img"))
    data = os.urandom(DATA)
    with source.open("wb") as disk:
        disk.truncate(APPARENT)
        disk.seek(DATA_AT)
        disk.write(data)
    log: list[str] = []
    try:
        with connections(cluster, opener=_test_driver(tmp_path)) as conns:
            domains.start(domains.define(conns.get("kvm0"), Artifacts(cluster).domain_xml(cluster.vm("db"))))
            migrate(cluster, "db", "kvm1", conns, force=True, log=log.append, cold=True)
            assert domains.is_active(conns.get("kvm1").lookupByName("db"))
            assert domains.lookup(conns.get("kvm0"), "db") is None
        on_source, on_target = str(tmp_path / "kvm0/db.img"), str(tmp_path / "kvm1/db.img")
        assert log[:3] == ["db: powered off on kvm0", f"db: copying {on_source}: 16/20 MiB ...",
                           f"db: copied {on_source} to kvm1:{on_target}"]
        assert target.stat().st_size == APPARENT
        # Allocated as on the source (20 MiB), not the apparent size (scp made it 200 MiB).
        assert abs(target.stat().st_blocks - source.stat().st_blocks) * 512 <= 1 << 20, (
            target.stat().st_blocks, source.stat().st_blocks)
        with target.open("rb") as copy:
            assert copy.read(DATA_AT) == bytes(DATA_AT)
            assert copy.read(DATA) == data
            assert copy.read() == bytes(APPARENT - DATA_AT - DATA)
        assert [p.name for p in target.parent.iterdir()] == ["db.img"]  # no temporary left beside it
    finally:
        for host in remote:  # the farm's tmpfs is shared by the cases: give its space back
            shutil.rmtree(seen(host, str(tmp_path)), ignore_errors=True)


def test_a_sender_that_fails_after_sending_data_fails_a_host_to_host_copy(
        example: Cluster, farm: sshfarm.Farm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GNU tar that meets a read error mid-way writes zeros for what it could not read, ends its archive properly
    and exits 2; the receiving tar succeeds on that archive. Host to host both run on the source host, behind one
    ssh: only the sender's status tells, and dash (Debian's sh) has no pipefail to pass it on.

    kvm0's tar here archives the disk, then fails on a path that is gone: a failure after its data, as a read error's.
    """
    cluster = _cluster(example, tmp_path, HOSTS)
    _ssh_wrapper(tmp_path / "bin", str(farm.ssh_config))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for host in HOSTS:
        (tmp_path / f"{host}.xml").write_text("<node/>\n")
        (farm.root(host) / str(tmp_path / host).lstrip("/")).mkdir(parents=True)
    with (farm.root("kvm0") / str(tmp_path / "kvm0/db.img").lstrip("/")).open("wb") as disk:
        disk.truncate(APPARENT)
        disk.write(b"kvmconf data" * 1000)
    failing_tar = farm.root("kvm0") / "usr/local/bin/tar"  # before /usr/bin on the PATH of ssh's commands
    failing_tar.write_text(f'#!/bin/bash\nif [ "$1" = --create ]; then exec -a tar {shutil.which("tar")} "$@"'
                           f' kvmconf-gone; fi\nexec -a tar {shutil.which("tar")} "$@"\n')  # -a: its messages say tar
    failing_tar.chmod(0o755)
    target_dir = farm.root("kvm1") / str(tmp_path / "kvm1").lstrip("/")
    try:
        with connections(cluster, opener=_test_driver(tmp_path)) as conns:
            domains.start(domains.define(conns.get("kvm0"), Artifacts(cluster).domain_xml(cluster.vm("db"))))
            with pytest.raises(MigrationFailed) as failed:
                migrate(cluster, "db", "kvm1", conns, force=True, log=lambda _: None, cold=True)
            assert domains.lookup(conns.get("kvm0"), "db") is not None
            assert domains.lookup(conns.get("kvm1"), "db") is None
        assert re.fullmatch(
            r"db: migration to kvm1 failed: localhost: `ssh -o BatchMode=yes -o ServerAliveInterval=15 -o"
            r" ServerAliveCountMax=4 kvm0 -- 'bash -o pipefail -c .* kvm1 -- .*` failed with exit status 2: tar:"
            r" kvmconf-gone: Cannot stat: No such file or directory\n"
            r"(Warning: Permanently added .* to the list of known hosts\.\n)?"  # kvm0 meeting kvm1 the first time
            r"tar: Exiting with failure status due to previous"
            r" errors; the copies on kvm1 were removed and the VM is still defined \(shut off\) on kvm0: start it"
            r" there with `invoke start`", str(failed.value)), str(failed.value)
        assert list(target_dir.iterdir()) == []
    finally:
        failing_tar.unlink()
        for host in HOSTS:
            shutil.rmtree(farm.root(host) / str(tmp_path).lstrip("/"), ignore_errors=True)
