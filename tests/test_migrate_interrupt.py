"""A real SIGTERM to a real `invoke migrate` on the lab's two libvirtd "hosts", while it copies.

cron's and systemd's timeouts and an admin's `kill` send SIGTERM; Ctrl-C is the same interrupt. The
run must take back what it made on the target (files, a domain) and leave the VM defined on its
source, then still end non-zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import libvirt
import libvirt_qemu
import pytest

from generators.model import Cluster
from generators.validate import load_cluster
from kvmconf import lab, migrate
from kvmconf import runner as runner_module
from kvmconf.connection import connections
from kvmconf.errors import KvmconfError
from kvmconf.provision import provision
from kvmconf.runner import Runner
from tests import test_lab
from tests.labs import another_tools_backup_running, quiet, running_lab, start_another_tools_backup
from tests.test_lab import ROOT, domains_on, lab_domain

pytestmark = [pytest.mark.services, pytest.mark.slow]

NETNS_PREFIX = "kvmconf-migtest-"  # + the pytest PID: a killed run's namespaces are removed by the next run

# The lab's per-test fixtures, with this module's own lab under them.
clean = test_lab.clean
workdir = test_lab.workdir


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Lab]:
    yield from running_lab(tmp_path_factory.mktemp("lab"), NETNS_PREFIX)


def _provision(workdir: Path, the_lab: lab.Lab, name: str) -> None:
    cluster = _lab_cluster(workdir, the_lab)
    with connections(cluster) as conns:
        provision(cluster, [name], conns, log=quiet)


@pytest.fixture
def migration(workdir: Path, clean: lab.Lab, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `invoke migrate ARGS` as the admin does, in a session of its own; whatever it left running is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, path: str = os.environ["PATH"]) -> subprocess.Popen[str]:
        env = {**os.environ, "KVMCONF_CLUSTER": str(workdir / "cluster.conf"),
               "KVMCONF_SITE": str(workdir / "site.toml"), "KVMCONF_LAB": str(clean.dir), "PATH": path}
        child = subprocess.Popen([sys.executable, "-m", "invoke", "migrate", *args], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        started.append(child)
        return child

    yield start
    for child in started:
        with suppress(ProcessLookupError):  # the run and what it started (a copy killed with it would be gone)
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _wait_for(done: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _interrupt(child: subprocess.Popen[str]) -> str:
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 1, output  # invoke's exit status for an interrupt; killed by SIGTERM would be -15
    return output


def test_sigterm_during_a_cold_copy_removes_the_copies_and_leaves_the_vm_defined_on_its_source(
        workdir: Path, clean: lab.Lab, tmp_path: Path, migration: Callable[..., subprocess.Popen[str]]) -> None:
    """The signal lands while the second file (the seed ISO) copies: the finished disk copy goes too.

    The copy is slowed by a `tar` first on PATH that runs the real one, then sleeps (holding the pipe to the
    extracting tar open, so the copy does not end): without that, a copy of these small sparse files ends
    before a signal could be timed.
    """
    _provision(workdir, clean, "cloud")  # on kvm1: a qcow2 overlay and a seed ISO
    # kvm0's 2 CPUs hold web's and db's vCPUs by cluster.conf: migrate validates the move, so make room for cloud's.
    site = workdir / "site.toml"
    site.write_text(site.read_text().replace("[hosts.kvm0]\n", "[hosts.kvm0]\ncpu_overcommit = 2.0\n"))
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    # Only the sending tar names the temporary (in its --transform); the file appears as the other one extracts it.
    (slow / "tar").write_text(f'#!/bin/sh\ncase "$*" in *-seed.iso.*.kvmconf-migrating*) {shutil.which("tar")} "$@";'
                              f' exec sleep 60;; esac\nexec {shutil.which("tar")} "$@"\n')
    (slow / "tar").chmod(0o755)
    target = clean.images / "kvm0"
    child = migration("--vm", "cloud", "--to", "kvm0", "--cold", "--force", path=f"{slow}:{os.environ['PATH']}")
    _wait_for(lambda: any(target.glob(".cloud-seed.iso.*.kvmconf-migrating")), "the seed ISO's copy")
    assert (target / "cloud.qcow2").is_file()  # the disk's copy is complete and in place
    output = _interrupt(child)
    assert output.splitlines()[-2:] == [
        ("cloud: migration to kvm0 interrupted; the copies on kvm0 were removed and the VM is still defined (shut off)"
         " on kvm1: start it there with `invoke start`"), "kvmconf: interrupted"]
    assert list(target.iterdir()) == []
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["cloud"])
    assert sorted(p.name for p in (clean.images / "kvm1").iterdir()) == ["cloud-seed.iso", "cloud.qcow2"]


def test_sigterm_during_a_live_migration_aborts_it_and_the_vm_keeps_running_on_its_source(
        workdir: Path, clean: lab.Lab, migration: Callable[..., subprocess.Popen[str]]) -> None:
    """libvirt copies memory and disk inside one call, where Python's signal handlers do not run: the job is aborted.

    The migration is slowed by libvirt's own bandwidth limit (1 MiB/s) over 256 MiB the guest wrote: left
    alone it would run for minutes (measured: 16 MiB copied in the first 10 s), so a run that ends within 40 s
    of the signal was aborted, not waited for, on however busy a machine: the margin is in the data, not in
    how fast this machine is.
    """
    _provision(workdir, clean, "web")  # qcow2, running on kvm0
    with lab_domain(clean, "kvm0", "web") as dom:
        command = 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x5a 1M 256M"'
        hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        assert libvirt_qemu.qemuMonitorCommand(dom, command, hmp).strip() == ""  # written as the guest would
        dom.migrateSetMaxSpeed(1, 0)
        child = migration("--vm", "web", "--to", "kvm1")
        _wait_for(lambda: domains_on(clean, "kvm1") == ["web"], "the incoming domain on kvm1")
        started = time.monotonic()
        output = _interrupt(child)
        assert time.monotonic() - started < 40, output  # aborted: waited for, it would take minutes
        assert output.splitlines()[-2:] == [("web: live migration to kvm1 interrupted; it still runs on kvm0 and"
                                             " the files made on kvm1 were removed"), "kvmconf: interrupted"]
        assert dom.isActive() and dom.isPersistent()
        assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert list((clean.images / "kvm1").iterdir()) == []


def test_a_long_live_migration_shows_its_progress(
        workdir: Path, clean: lab.Lab, migration: Callable[..., subprocess.Popen[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It said "migrating live ..." and then nothing until the end, minutes to hours for a big disk.

    Slowed as above (1 MiB/s over 256 MiB the guest wrote): the first report comes after 10 s, long before the end.
    """
    _provision(workdir, clean, "web")
    # Not PYTHONUNBUFFERED, as in an admin's shell: a pipe (`| tee`, cron's log) gets each line when it is said all the
    # same. Printed lines waited in Python's buffer until the run ended.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    with lab_domain(clean, "kvm0", "web") as dom:
        command = 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x5a 1M 256M"'
        hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        assert libvirt_qemu.qemuMonitorCommand(dom, command, hmp).strip() == ""
        dom.migrateSetMaxSpeed(1, 0)
        child = migration("--vm", "web", "--to", "kvm1")
        assert child.stdout is not None
        got: queue.Queue[str] = queue.Queue()

        def read(stream: IO[str]) -> None:
            for line in stream:
                got.put(line)

        reader = threading.Thread(target=read, args=(child.stdout,), daemon=True)
        reader.start()
        lines: list[str] = []
        with suppress(queue.Empty):  # a report is due 10 s in; the copy runs for minutes
            while len(lines) < 2:
                lines.append(got.get(timeout=60))
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 1
        reader.join(timeout=60)
        output = "".join(lines + list(got.queue))
    assert len(lines) == 2 and lines[0] == "web: migrating live to kvm1 (memory and disk) ...\n", output
    # The disk's whole size (what libvirt mirrors) first; the memory's once that phase has begun.
    assert re.fullmatch(r"web: migrating: disk \d+/1024 MiB(, memory \d+/\d+ MiB)? \.\.\.\n", lines[1]), output
    assert output.splitlines()[-2:] == [("web: live migration to kvm1 interrupted; it still runs on kvm0 and the"
                                         " files made on kvm1 were removed"), "kvmconf: interrupted"]


def _lab_cluster(workdir: Path, the_lab: lab.Lab) -> Cluster:
    return lab.remap(load_cluster(workdir / "cluster.conf", workdir / "site.toml"), the_lab)


@pytest.mark.parametrize("cold", [False, True])
def test_a_migration_is_refused_while_another_tools_job_runs_and_leaves_it_running(
        workdir: Path, clean: lab.Lab, tmp_path: Path, cold: bool) -> None:
    """libvirt runs one job per VM: a live migration would wait 30 s for it and fail on a lock, a cold one would
    power the VM off under another tool's backup."""
    _provision(workdir, clean, "web")
    cluster = _lab_cluster(workdir, clean)
    with lab_domain(clean, "kvm0", "web") as dom, another_tools_backup_running(dom, tmp_path) as other_socket, \
            connections(cluster) as conns:
        with pytest.raises(KvmconfError) as refused:
            migrate.migrate(cluster, "web", "kvm1", conns, force=cold, log=quiet, cold=cold)
        assert str(refused.value) == ("web: another job runs on the VM (operation: backup): it is left alone and"
                                      " nothing was changed; migrate again when it has ended")
        assert f"socket='{other_socket}'" in dom.backupGetXMLDesc(0) and dom.isActive()
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert list((clean.images / "kvm1").iterdir()) == []


def test_an_interrupt_while_migrate3_waits_for_another_tools_job_leaves_that_job_running(
        workdir: Path, clean: lab.Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another tool's backup starts after migrate's check; migrate3 waits for it, and a Ctrl-C comes meanwhile.

    The interrupt used to abort whatever job ran: the other tool's. Now that one runs on, and only the migration
    is aborted, once it has begun (when the other job ends); the VM stays on its source. The migration is slowed
    as in the SIGTERM test above, so it cannot complete before the abort.
    """
    _provision(workdir, clean, "web")
    cluster = _lab_cluster(workdir, clean)
    real_migrate3 = migrate._abortable_migrate3
    waiting = threading.Event()
    seen: dict[str, bool] = {}

    def other_job_first(dom: libvirt.virDomain, *args: Any) -> libvirt.virDomain:
        start_another_tools_backup(dom, tmp_path)
        waiting.set()
        try:
            return real_migrate3(dom, *args)
        finally:
            waiting.clear()

    def interrupt_then_end_the_other_job(dom: libvirt.virDomain) -> None:
        assert waiting.wait(120)
        time.sleep(1)  # migrate3 waits for the other job's lock (30 s at most)
        if waiting.is_set():  # never a Ctrl-C to pytest itself, outside the migration
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the interrupted run polls the job meanwhile: it must not abort it
        try:
            seen["other job ran on"] = "other-tool/nbd.sock" in dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:  # aborted: the migration then runs; aborting it keeps a failing test short
            seen["other job ran on"] = False
        dom.abortJob()  # the other tool ends: the migration begins, and is aborted

    monkeypatch.setattr(migrate, "_abortable_migrate3", other_job_first)
    with lab_domain(clean, "kvm0", "web") as dom, connections(cluster) as conns:
        command = 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x5a 1M 256M"'
        assert libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP) == ""
        dom.migrateSetMaxSpeed(1, 0)
        other_tool = threading.Thread(target=interrupt_then_end_the_other_job, args=(dom,), daemon=True)
        other_tool.start()
        log: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            migrate.migrate(cluster, "web", "kvm1", conns, log=log.append)
        other_tool.join(60)
        assert seen == {"other job ran on": True}
        assert log[-1] == ("web: live migration to kvm1 interrupted; it still runs on kvm0 and the files made on kvm1"
                           " were removed"), log
        assert dom.isActive() and dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert list((clean.images / "kvm1").iterdir()) == []


@pytest.mark.parametrize("cold", [False, True])
def test_a_vm_with_a_disk_cluster_conf_does_not_give_it_is_not_moved(
        workdir: Path, clean: lab.Lab, cold: bool) -> None:
    """An admin attached a raw data disk to a qcow2 VM: a cold move defined the VM on the target without it (its data
    left behind, said only as a line of the diff), and a live one mirrored it into the same path on the target, over
    whatever was there. Refused before anything is done, naming the disk."""
    _provision(workdir, clean, "web")
    cluster = _lab_cluster(workdir, clean)
    data = clean.images / "kvm0" / "web-data.img"
    data.write_bytes(b"")
    os.truncate(data, 64 << 20)
    attach = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{data}'/>"
              "<target dev='vdb' bus='virtio'/></disk>")
    with lab_domain(clean, "kvm0", "web") as dom, connections(cluster) as conns:
        dom.attachDeviceFlags(attach, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        with pytest.raises(KvmconfError) as refused:
            migrate.migrate(cluster, "web", "kvm1", conns, force=cold, log=quiet, cold=cold)
        assert dom.isActive()
    assert str(refused.value) == (
        f"web: its domain on kvm0 has disks that cluster.conf does not give it: {data}; a migration moves only"
        f" {clean.images}/kvm0/web.qcow2, so it would start on kvm1 without them (cold) or mirror them into whatever is"
        " at that path there (live); nothing was changed (make cluster.conf say the disk the VM has, or detach the"
        " others)")
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["web"], [])
    assert list((clean.images / "kvm1").iterdir()) == []



def test_a_cold_move_of_an_overlay_onto_another_base_image_of_the_same_name_is_refused(
        workdir: Path, clean: lab.Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm0 has a newer cloud image under the same path: the copied overlay would have read its blocks under the
    VM's own, a corrupt disk. The lab's two hosts share one machine and one base file, so kvm0's commands run in a
    mount namespace of their own where another image is mounted over that path: another host's view, by real
    commands (libvirt's QEMU, outside it, would still read the lab's base)."""
    _provision(workdir, clean, "cloud")
    site = workdir / "site.toml"
    site.write_text(site.read_text().replace("[hosts.kvm0]\n", "[hosts.kvm0]\ncpu_overcommit = 2.0\n"))
    cluster = _lab_cluster(workdir, clean)
    base = cluster.os_of(cluster.vm("cloud")).cloud_image
    assert base is not None
    newer = tmp_path / "newer.qcow2"
    shutil.copy(base, newer)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(newer)], check=True,
                   stdout=subprocess.DEVNULL)
    mounted = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
               'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(newer), base]

    def on_kvm0(argv: Sequence[str], stdin: bytes | None) -> runner_module.Result:
        return runner_module._execute([*mounted, *argv], stdin)

    with connections(cluster) as conns:
        real_runner = conns.runner
        monkeypatch.setattr(conns, "runner", lambda host: Runner(execute=on_kvm0) if host == "kvm0"
                            else real_runner(host))
        with pytest.raises(KvmconfError) as refused, lab_domain(clean, "kvm1", "cloud") as dom:
            migrate.migrate(cluster, "cloud", "kvm0", conns, force=True, log=quiet, cold=True)
        assert dom.isActive()
    here, there = (hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] for f in (base, newer))
    assert str(refused.value) == (
        f"cloud: its disk {clean.images}/kvm1/cloud.qcow2 is an overlay on {base}, and that file on kvm0 is not the one"
        f" on kvm1 (sha256 {there}... there, {here}... here): the copy would read the other image's blocks; nothing"
        " was changed: put the same base image on kvm0 first (or use a live migration, which copies the base's data"
        " too)")
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == ([], ["cloud"])
    assert list((clean.images / "kvm0").iterdir()) == []


def test_a_live_move_of_an_overlay_copies_its_own_data_not_its_base_images(
        workdir: Path, clean: lab.Lab, tmp_path: Path) -> None:
    """libvirt copied the whole chain (NON_SHARED_DISK) into the target's new overlay: the base's data crossed the
    wire and filled the thin overlay (a real cloud image: gigabytes per VM). With the same base on the target, only
    the overlay's own data goes (NON_SHARED_INC), and the guest reads the base's blocks and its own there."""
    cluster = _lab_cluster(workdir, clean)
    base = cluster.os_of(cluster.vm("cloud")).cloud_image
    assert base is not None
    shutil.copy(base, tmp_path / "base-aside")  # the module's lab shares it: put back after
    try:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 32M", base], check=True,
                       stdout=subprocess.DEVNULL)
        _provision(workdir, clean, "cloud")  # on kvm1
        site = workdir / "site.toml"
        site.write_text(site.read_text().replace("[hosts.kvm0]\n", "[hosts.kvm0]\ncpu_overcommit = 2.0\n"))
        cluster = _lab_cluster(workdir, clean)
        hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        io = 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{}"'
        with lab_domain(clean, "kvm1", "cloud") as dom:
            assert libvirt_qemu.qemuMonitorCommand(dom, io.format("write -P 0x5a 512M 1M"), hmp) == ""
        log: list[str] = []
        with connections(cluster) as conns:
            migrate.migrate(cluster, "cloud", "kvm0", conns, log=log.append)
        moved = clean.images / "kvm0" / "cloud.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(moved)], check=True,
                                         capture_output=True, text=True).stdout)
        assert info["actual-size"] < 8 << 20, (info, log)
        assert info["backing-filename"] == base, info
        with lab_domain(clean, "kvm0", "cloud") as dom:
            dom.destroy()  # QEMU quits on SIGTERM first, writing out the overlay's metadata: the file is whole
        for check, size in (("read -P 0x11 0 32M", 32 << 20), ("read -P 0x5a 512M 1M", 1 << 20)):
            read = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", check, str(moved)], capture_output=True,
                                  text=True)
            assert f"read {size}/{size} bytes" in read.stdout and "verification failed" not in read.stdout, read
    finally:
        test_lab._empty(clean)  # no VM holds the base when it is put back
        shutil.copy(tmp_path / "base-aside", base)


def test_a_cold_move_drops_the_bitmaps_of_checkpoints_that_do_not_move(workdir: Path, clean: lab.Lab) -> None:
    """A backed-up VM's qcow2 carries the dirty bitmap of its checkpoint; the checkpoint (libvirt's metadata of the
    source's domain) does not move, so on the target the bitmap was kept up to date on every write, for nothing."""
    _provision(workdir, clean, "web")
    cluster = _lab_cluster(workdir, clean)
    with lab_domain(clean, "kvm0", "web") as dom:
        dom.checkpointCreateXML("<domaincheckpoint><name>kvmconf-20261123T000000Z</name></domaincheckpoint>", 0)
    log: list[str] = []
    with connections(cluster) as conns:
        migrate.migrate(cluster, "web", "kvm1", conns, force=True, log=log.append, cold=True)
    with lab_domain(clean, "kvm1", "web") as dom:
        assert dom.listAllCheckpoints() == []
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(clean.images / "kvm1/web.qcow2")],
                                     check=True, capture_output=True, text=True).stdout)
    assert "bitmaps" not in info["format-specific"]["data"], info
    assert ("web: removed from the copy on kvm1 the bitmaps of its checkpoints, which do not move with it:"
            " kvmconf-20261123T000000Z (the next backup on kvm1 is a full one)") in log


def _asked(to: str) -> str:
    return (f"nothing was made on {to}. The guest was asked to shut down (ACPI) and may still do so: check it with"
            " `invoke status`, start it with `invoke start` if it went down, or run again with --force to power it off")


def test_a_shutdown_that_takes_too_long_says_the_guest_may_still_go_down(workdir: Path, clean: lab.Lab) -> None:
    """db has no OS (install=none): it never acts on the ACPI request. A real guest may, after the run gave up: the
    message said "it still runs", and a VM that went down a minute later was a surprise."""
    _provision(workdir, clean, "db")
    cluster = _lab_cluster(workdir, clean)
    with connections(cluster) as conns, pytest.raises(migrate.MigrationFailed) as failed:
        migrate.migrate(cluster, "db", "kvm1", conns, shutdown_timeout=1, log=quiet, cold=True)
    assert str(failed.value) == f"db: did not shut down on kvm0 within 1 s; {_asked('kvm1')}"
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["db"], [])


def test_an_interrupt_while_the_vm_shuts_down_says_the_guest_may_still_go_down(
        workdir: Path, clean: lab.Lab) -> None:
    """A real Ctrl-C (SIGINT) while the run waits for the guest to shut down: it ended on "interrupted" alone."""
    _provision(workdir, clean, "db")
    cluster = _lab_cluster(workdir, clean)
    log: list[str] = []

    def interrupt_once_it_waits() -> None:
        _wait_for(lambda: bool(log) and log[-1] == "db: shutting down on kvm0 ...", "the shutdown")
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    ctrl_c = threading.Thread(target=interrupt_once_it_waits, daemon=True)
    ctrl_c.start()
    with connections(cluster) as conns, pytest.raises(KeyboardInterrupt):
        migrate.migrate(cluster, "db", "kvm1", conns, shutdown_timeout=60, log=log.append, cold=True)
    ctrl_c.join(60)
    assert log[-1] == f"db: migration to kvm1 interrupted while it shuts down on kvm0; {_asked('kvm1')}"
    assert (domains_on(clean, "kvm0"), domains_on(clean, "kvm1")) == (["db"], [])
