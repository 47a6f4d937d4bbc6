"""`invoke migrate`: move a VM to another physical host, live when it runs, else cold.

Live (the VM runs and ``cold`` is not asked): the target's disk is created empty as provisioning
would, the seed ISO copied, and libvirt copies memory and disk while the guest runs
(VIR_MIGRATE_LIVE | NON_SHARED_DISK: no shared storage needed; NON_SHARED_INC, the overlay's own data only, for
an install=cloud overlay whose base is the same file on the target); the source domain stays defined
(shut off) until the target runs, then is undefined. If libvirt refuses or fails, the guest keeps
running on the source and the target's files are removed: the message names ``--cold``.

Cold, in an order that never leaves the VM without a working copy: shut the VM down (ACPI; or
power it off with ``force``), copy its disk (and seed ISO) to the target host's paths, define it
there from the generated XML, start it, wait until it runs, and only then undefine it on the
source. The copy keeps a thin disk thin and reports its progress as it goes (:func:`copy_file`);
it has no time limit, but its ssh gives up on a link that stopped answering for a minute.

Either way, an install=cloud overlay's base image must be usable on the target (for a cold move, the very file the
overlay's header names, byte for byte: sha256), and the target's disk_dir must be there with room for the VM's files
(their allocated size): that is checked before the VM is stopped or anything is made there.

A failure, Ctrl-C or SIGTERM (cron's or systemd's timeout, `kill`) on the way removes what the run
made on the target (files, a domain it defined) and leaves the VM defined on its source; an
interrupt then still ends the run. Once the VM runs on the target, only undefining the source is left: a failure
or an interrupt there says that it runs on the target and how to undefine its out-of-date source (never to start
it), and a second run says the same instead of asking to remove the domain on the target, the one that runs.
A live migration runs in a worker thread so that an interrupt can abort libvirt's job at once.

Either way the source's disk files stay where they were (the message says where) until the admin
removes them, and cluster.conf still says the old ``host=``: the task says which line to change,
or changes it with ``edit``.

Nothing is done unless cluster.conf with the new ``host=`` on the VM's line (what ``edit`` writes)
passes the project's validation: the target's capacity, and the VM's cpuset, NUMA node and nic= devices
on that host are checked there before any host is contacted. Nor is it done when the domain has a disk other than
the one cluster.conf gives the VM (and its seed ISO): a disk attached by hand, or the old one after disk= changed.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import shlex
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from pathlib import Path

import libvirt

from generators.errors import ConfigError
from generators.files import replace_text
from generators.inventory import BOM
from generators.model import Cluster, DiskKind, Vm
from generators.nagios import backup_targets
from generators.paths import disk_path, seed_iso_path
from generators.validate import load_cluster
from kvmconf import disks, domains, jobs
from kvmconf.cli import say  # each line flushed as it is said: a log of both streams keeps their order
from kvmconf.connection import Connections
from kvmconf.defined import inventory
from kvmconf.errors import CommandFailed, KvmconfError, WrongUsage
from kvmconf.migrate_checks import Moves, allocated, check_target
from kvmconf.plan import Artifacts, find_host, find_vm
from kvmconf.runner import Runner, describe_failure, run_pipeline
from kvmconf.signals import sigterm_as_interrupt
from kvmconf.waiting import wait_until

Log = Callable[[str], None]
Progress = Callable[[int, int], None]  # bytes done, bytes in all
_RECORD = 1 << 20  # tar's record (--blocking-factor in 512-byte blocks): its checkpoints count records
_CHECKPOINT = 16  # records between two progress reports: 16 MiB
_PROGRESS_WORD = "kvmconf-copied"  # tar prints "<its argv[0]>: kvmconf-copied <records>" on stderr at each checkpoint
_PROGRESS_LINE = re.compile(rf"[^\n]*: {_PROGRESS_WORD} (\d+)")
_PROGRESS_EVERY = 10.0  # seconds between two progress lines of one copy or live migration
_HOST_WORD = re.compile(r"(?<!\S)host=\S*")
# A copy has no time limit, so a dropped link must end its ssh: after 4 keepalives 15 s apart go unanswered (about a
# minute), ssh gives up and the copy fails, instead of hanging forever with the VM shut down.
_KEEPALIVE = ("-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")
_ABORT_POLL = 0.2  # seconds between two looks at whether an interrupted migration's job can be aborted


class MigrationFailed(KvmconfError):
    """A step of the migration failed; the source VM is still defined (the message says what was done)."""


def on_host(cluster: Cluster, vm: Vm, host: str) -> tuple[Cluster, Vm]:
    """The cluster with ``vm`` placed on ``host``: what to define there."""
    moved = dataclasses.replace(vm, host=host, auto_placed=False)
    return dataclasses.replace(cluster, vms=tuple(moved if v.name == vm.name else v for v in cluster.vms)), moved


def files_to_copy(cluster: Cluster, vm: Vm, target: Cluster, moved: Vm) -> Moves:
    pairs = [(disk_path(cluster, vm), disk_path(target, moved))]
    seed, moved_seed = seed_iso_path(cluster, vm), seed_iso_path(target, moved)
    if seed is not None and moved_seed is not None:
        pairs.append((seed, moved_seed))
    return Moves(tuple(pairs))


def copy_file(source: Runner, target: Runner, src: str, dst: str, placed: Callable[[str], None],
              progress: Progress = lambda _done, _total: None) -> None:
    """Copy a (sparse) disk file between hosts, never over a file at ``dst``; ``placed(dst)`` once it is there.

    The copy goes to a temporary name that :func:`disks.make_new` links into place and removes, also on an
    interrupt: a file that appeared at ``dst`` after the migration's check is neither replaced nor removed.
    GNU tar carries it (:func:`_copy_pipeline`): holes stay holes on the target and are never sent, so a
    thin 200 GB disk with 5 GB written moves 5 GB and takes 5 GB there. ``progress(done, total)`` gets the
    bytes sent so far and the source's allocated size, every :data:`_CHECKPOINT` MiB; the copy has no time
    limit (it takes as long as the data needs).
    """
    total = allocated(source, src)

    def watch(line: str) -> bool:
        match = _PROGRESS_LINE.fullmatch(line)
        if match:
            progress(min(int(match[1]) * _RECORD, total), total)
        return match is not None

    def copy(tmp: str) -> None:
        argvs = _copy_pipeline(source, target, src, tmp)
        result = run_pipeline(argvs, watch)
        if result.returncode != 0:  # run here, ssh in it names the hosts
            raise CommandFailed(describe_failure("localhost", " | ".join(map(shlex.join, argvs)), result))

    if not disks.make_new(target, dst, "kvmconf-migrating", copy, placed):
        raise KvmconfError(f"something else appeared at {dst} during the copy; it is never overwritten and was left"
                           " as it is")












def _drop_bitmaps(vm: Vm, to: str, dst_run: Runner, disk: str, log: Log) -> None:
    """Remove the persistent dirty bitmaps a qcow2 copy carries: those of the VM's checkpoints (a backup's).

    The checkpoints themselves are libvirt's metadata of the source's domain, which do not move (the domain is
    defined anew on the target, and the source's is undefined with them): each bitmap would be kept up to date on
    every write of the guest there, for no checkpoint, forever. A live migration carries none.
    """
    if vm.disk.kind is not DiskKind.QCOW2:
        return
    info = json.loads(dst_run.check(["qemu-img", "info", "--output=json", "--", disk]).stdout)
    names = [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]
    for name in names:
        dst_run.check(["qemu-img", "bitmap", "--remove", "--", disk, name])
    if names:
        log(f"{vm.name}: removed from the copy on {to} the bitmaps of its checkpoints, which do not move with it:"
            f" {', '.join(names)} (the next backup on {to} is a full one)")


def _copy_pipeline(source: Runner, target: Runner, src: str, tmp: str) -> list[list[str]]:
    """The commands, run on this machine, that copy ``src`` on the source host to ``tmp`` on the target host.

    GNU tar, because it is on every Debian host (Essential: yes), as ssh is on a host reached by it: rsync is not
    (kvm-setup does not install it), scp writes every zero of a thin disk, and ``dd conv=sparse`` would still
    send them. ``--sparse`` sends the data map and the data only; extracting writes the data at its offsets.
    """
    directory, name = posixpath.split(src)
    # The member is named as the temporary from the start: extracting it makes exactly that file, nothing else.
    member = re.sub(r"[\\&,]", r"\\\g<0>", posixpath.basename(tmp))  # literal in sed's replacement
    # --dereference: a symlinked disk is sent as its file; archived as a link, --transform would rename its target too.
    send = ["tar", "--create", "--sparse", "--dereference", f"--blocking-factor={_RECORD // 512}",
            f"--checkpoint={_CHECKPOINT}", f"--checkpoint-action=echo={_PROGRESS_WORD} %u",
            f"--transform=s,.*,{member},", "--file=-", f"--directory={directory or '.'}", "--", name]
    receive = ["tar", "--extract", f"--blocking-factor={_RECORD // 512}", "--read-full-records", "--file=-",
               f"--directory={posixpath.dirname(tmp) or '.'}", "--no-same-owner"]  # root's, as cp and scp made it
    if source.ssh is not None and target.ssh is not None:
        # The source host pushes straight to the target host (it needs SSH access to it, as the admin has): the
        # data does not pass through this machine. bash's pipefail (bash is Essential on Debian; dash, its sh, has
        # no pipefail): a sender that fails mid-way (a read error) still ends its archive properly, with zeros for
        # what it could not read, and the receiver succeeds; the sender's status is then the only sign.
        pipeline = f"{shlex.join(send)} | {shlex.join(target.argv(receive, _KEEPALIVE))}"
        return [source.argv(["bash", "-o", "pipefail", "-c", pipeline], _KEEPALIVE)]
    return [source.argv(send, _KEEPALIVE), target.argv(receive, _KEEPALIVE)]


def _progress_lines(log: Log, what: str) -> Progress:
    """``log`` a copy's progress: at its first checkpoint, then every :data:`_PROGRESS_EVERY` seconds."""
    last: list[float] = []

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not last or now - last[0] >= _PROGRESS_EVERY:
            last[:] = [now]
            log(f"{what}: {done >> 20}/{total >> 20} MiB ...")
    return progress


@contextmanager
def _undone_on_failure(dst_run: Runner, what: str, state: str, log: Log, hint: str = "",
                       finished: Callable[[], str | None] = lambda: None) -> Iterator[list[str]]:
    """Inside, the caller lists each file it makes on the target host; a failure or an interrupt removes them.

    ``what`` names the step ("db: migration to kvm1"), ``state`` says where the VM is once the files are
    gone. The errors a migration expects (KvmconfError, libvirtError, OSError) become MigrationFailed.
    Ctrl-C and SIGTERM (cron's or systemd's timeout, `kill`) clean up the same, log the state, and go on
    as KeyboardInterrupt: the run still ends, non-zero. Unless ``finished()`` says the VM runs on the
    target by then (an interrupt that came as libvirt completed): its files are in use and stay.
    """
    made: list[str] = []
    try:
        with sigterm_as_interrupt():
            yield made
    except (KvmconfError, libvirt.libvirtError, OSError) as err:
        raise MigrationFailed(f"{what} failed: {err}; {state}{_remove_all(dst_run, made)}{hint}") from None
    except KeyboardInterrupt:
        moved = finished()
        log(f"{what} interrupted; {moved or state + _remove_all(dst_run, made)}")
        raise


def _remove_all(dst_run: Runner, paths: list[str]) -> str:
    """Remove each of ``paths``; returns "" or what could not be removed, for the message (never raises)."""
    failed = []
    for path in paths:
        try:
            dst_run.remove(path)
        except (KvmconfError, OSError) as err:
            failed.append(f"{path}: {err}")
    return f" (BUT COULD NOT REMOVE, remove by hand: {'; '.join(failed)})" if failed else ""


def _abortable_migrate3(dom: libvirt.virDomain, dst_conn: libvirt.virConnect, params: dict[str, object],
                        flags: int, progress: Callable[[], None] = lambda: None) -> libvirt.virDomain:
    """``dom.migrate3`` (returns the target's domain), but an interrupt aborts libvirt's job.

    Python runs signal handlers in the main thread between its own steps, never inside a libvirt call:
    a Ctrl-C or SIGTERM would wait for the whole migration (minutes for a big disk). So the call runs
    in a worker; an interrupt aborts the job, libvirt removes the target's incoming domain, the guest
    keeps running on the source, and then the interrupt goes on.

    Only a migration is aborted: a job another tool started since migrate()'s check (a backup) holds the
    domain while migrate3 waits for it, and is left to run; the migration is aborted once it has begun.
    ``progress()`` is called every :data:`_PROGRESS_EVERY` seconds while it runs.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="migrate3") as worker:
        job = worker.submit(dom.migrate3, dst_conn, params, flags)
        try:
            while wait([job], timeout=_PROGRESS_EVERY).not_done:
                progress()
            return job.result()
        except KeyboardInterrupt:
            while not job.done():  # until libvirt has undone its part (or completed, too far along to abort)
                if jobs.operation(dom) == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
                    with suppress(libvirt.libvirtError):  # it has just ended, or cannot be aborted yet: ask again
                        dom.abortJob()
                wait([job], timeout=_ABORT_POLL)
            raise


def _live_progress(dom: libvirt.virDomain, what: str, log: Log) -> Callable[[], None]:
    """A live migration's progress as libvirt's job counts it: the disk copied ahead of the memory, then the memory.

    A big disk takes minutes to hours: without it the run says nothing between its first line and its last.
    """
    def progress() -> None:
        try:
            stats = dom.jobStats()
        except libvirt.libvirtError:
            return  # between two phases, or ended: the next report, or the result, says more
        parts = [f"{kind} {stats[done] >> 20}/{stats[total] >> 20} MiB" for kind, done, total in (
            ("disk", libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED, libvirt.VIR_DOMAIN_JOB_DISK_TOTAL),
            ("memory", libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED, libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL))
            if stats.get(total)]
        if parts:
            log(f"{what}: {', '.join(parts)} ...")
    return progress


def _live_xml(xml: str, moves: Moves) -> str:
    """The running domain's migratable XML with the disk and seed paths of the target host."""
    root = ET.fromstring(xml)
    paths = dict(moves.files)
    for source in root.iterfind("devices/disk/source"):
        for attr in ("file", "dev"):
            if source.get(attr) in paths:
                source.set(attr, paths[source.get(attr, "")])
    return ET.tostring(root, encoding="unicode")






def _disk_size(dom: libvirt.virDomain, path: str) -> int | None:
    """The virtual size in bytes of the domain's disk ``path``; None when libvirt cannot say (then cluster.conf's)."""
    try:
        return int(dom.blockInfo(path)[0])
    except libvirt.libvirtError:
        return None


def _migrate_live(vm: Vm, to: str, conns: Connections, dom: libvirt.virDomain, target: Cluster, moved: Vm,
                  moves: Moves, log: Log, incremental: bool = False) -> libvirt.virDomain:
    """Copy memory and disk to ``to`` while the guest runs; on failure it still runs on the source.

    ``incremental``: the disk is an overlay whose base is on ``to`` already; only the overlay's own data is copied.
    """
    src_run, dst_run, dst_conn = conns.runner(vm.host), conns.runner(to), conns.get(to)

    def finished() -> str | None:
        """After an interrupt: the state when the migration completed all the same (no domain of its name was there)."""
        try:
            if domains.lookup(dst_conn, vm.name) is None:
                return None
        except libvirt.libvirtError as err:  # if it runs there, its files are in use: leave them
            return (f"{to} cannot say whether it runs there ({err.get_error_message()}); nothing was removed on {to}:"
                    f" check both hosts with `invoke status`")
        return (f"it had moved all the same: it runs on {to}, and is still defined (shut off) on {vm.host}; check it"
                f" on {to}, then undefine it on {vm.host}")

    with _undone_on_failure(dst_run, f"{vm.name}: live migration to {to}",
                            f"it still runs on {vm.host} and the files made on {to} were removed", log,
                            " (try --cold: shut down, copy, start there)", finished) as made:
        # Each file is listed once it is this run's: a file that appeared there since the check is not.
        # Empty, and the size the VM's disk is now, which libvirt requires of the disk it mirrors into: cluster.conf
        # may say another (a size raised there, which provision never applies to a disk).
        disks.create(dst_run, disks.disk_spec(target, moved), made.append, _disk_size(dom, moves.files[0][0]))
        for src, dst in moves.files[1:]:  # the seed ISO is read-only: libvirt does not copy it
            copy_file(src_run, dst_run, src, dst, made.append, _progress_lines(log, f"{vm.name}: copying {src}"))
        xml = _live_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), moves)
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
                                     libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml}
        if src_run.ssh is None and dst_run.ssh is None:
            # Both "hosts" are this machine (the lab): QEMU's streams go over loopback, not the machine's name.
            params[libvirt.VIR_MIGRATE_PARAM_URI] = "tcp://127.0.0.1"
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = "127.0.0.1"
        copy = libvirt.VIR_MIGRATE_NON_SHARED_INC if incremental else libvirt.VIR_MIGRATE_NON_SHARED_DISK
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | copy
        log(f"{vm.name}: migrating live to {to} (memory and disk) ...")
        new = _abortable_migrate3(dom, dst_conn, params, flags, _live_progress(dom, f"{vm.name}: migrating", log))
    return new


def _placed_there_already(cluster: Cluster, vm: Vm, conns: Connections) -> str:
    """Why a move to the host cluster.conf gives the VM is refused; and, when a migrate without --edit left it
    defined on another host, where it is and how to bring it back (the plan's hint for such a VM)."""
    try:
        listed = inventory(cluster, conns).domains  # a host it cannot reach is left out
    except libvirt.libvirtError:
        listed = []  # the hint is a courtesy: the refusal stands without it
    elsewhere = [d for d in listed if d.name == vm.name and vm.host not in d.hosts]
    if not elsewhere:
        return f"{vm.name}: cluster.conf places it on {vm.host} already"
    return (f"{vm.name}: cluster.conf places it on {vm.host} already, but it is defined on {elsewhere[0].where}: to"
            f" move it back, set host={min(elsewhere[0].hosts)} for it in cluster.conf and run `invoke migrate"
            f" --vm {vm.name} --to {vm.host} --edit`")


def migrate(cluster: Cluster, name: str, to: str, conns: Connections, force: bool = False,
            shutdown_timeout: float = 120.0, log: Log = say, cold: bool = False) -> Vm:
    """Move VM ``name`` from its host in cluster.conf to host ``to``; returns the VM as it is now placed."""
    if force and not cold:
        # Refused rather than ignored: a live migration never stops the guest, so --force alone would do nothing.
        raise WrongUsage("--force powers a running VM off for a cold migration: give it together with --cold")
    vm = find_vm(cluster, name)
    find_host(cluster, to, "name the host to move the VM to with --to HOST")
    # Both are requests with nothing to do, whatever the hosts say: usage errors (exit 2), as an unknown --to is.
    if to == vm.host:
        raise WrongUsage(_placed_there_already(cluster, vm, conns))
    if conns.uri(to) == conns.uri(vm.host):
        raise WrongUsage(f"{name}: {vm.host} and {to} are the same libvirt ({conns.uri(to)}): nothing to move")
    if vm.disk.kind is DiskKind.LVM:
        raise KvmconfError(f"{name}: its disk is an LVM volume; migration copies and creates disk files only (create"
                           f" the volume on {to} and copy it with dd, then provision there with --reuse-disk)")
    check_moved_cluster(cluster, vm, to)
    src_conn, dst_conn = conns.get(vm.host), conns.get(to)
    dom = domains.lookup(src_conn, name)
    if dom is None:
        raise KvmconfError(f"{name}: not defined on {vm.host} ({conns.uri(vm.host)}): nothing to move")
    if jobs.active(dom):  # a migration would wait 30 s for it and fail; a cold one would power the VM off under it
        raise KvmconfError(f"{name}: another job runs on the VM ({jobs.describe(dom)}): it is left alone and nothing"
                           " was changed; migrate again when it has ended")
    there = domains.lookup(dst_conn, name)
    if there is not None and domains.is_active(there) and not domains.is_active(dom):
        # What a move that did not finish leaves: "remove it first" would have the admin remove the VM that runs.
        raise KvmconfError(f"{name}: it runs on {to} already; {_left_on_source(vm, to, conns.uri(vm.host))}")
    if there is not None:
        raise KvmconfError(f"{name}: a domain of that name is defined on {to} already; remove it first")
    target, moved = on_host(cluster, vm, to)
    moves = files_to_copy(cluster, vm, target, moved)
    dst_run = conns.runner(to)
    in_the_way = dst_run.existing([dst for _, dst in moves.files])
    if in_the_way:
        raise KvmconfError(f"{name}: {', '.join(sorted(in_the_way))} exists on {to} already and is never"
                           " overwritten; nothing was changed (a migration keeps the files it moved away from: if"
                           f" this is what an earlier move of {name} off {to} left, remove it there and run this"
                           " again)")

    live = domains.is_active(dom) and not cold
    # Before the VM is stopped or anything is made on the target.
    incremental = check_target(vm, to, dom, conns.runner(vm.host), dst_run, moves, disks.disk_spec(target, moved),
                               live, target)

    if live:
        new = _migrate_live(vm, to, conns, dom, target, moved, moves, log, incremental)
        if not wait_until(lambda: new.state()[0] == libvirt.VIR_DOMAIN_RUNNING, 60, every=0.2):
            raise MigrationFailed(f"{name}: migrated to {to} but it does not run there; it stays defined on"
                                  f" {vm.host}: check both with `invoke status`")
    else:
        new = _migrate_cold(vm, to, conns, dom, target, moved, moves, force, shutdown_timeout, log)
    log(f"{vm.name}: running on {to}")
    with _finishing(vm, to, conns.uri(vm.host), log):
        domains.set_autostart(new, moved.autostart)
        domains.set_autostart(dom, False)
        domains.undefine(dom, keep_nvram=False)
    log(f"{vm.name}: undefined on {vm.host}; its files there are kept: {', '.join(src for src, _ in moves.files)}")
    return moved


def _left_on_source(vm: Vm, to: str, uri: str) -> str:
    """The state once the VM runs on ``to`` but its source is still defined, and the way out."""
    return (f"it is still defined (shut off) on {vm.host}, where its disk is now out of date: never start it there;"
            f" undefine it with `virsh -c {uri} undefine {vm.name} --nvram --checkpoints-metadata"
            f" --snapshots-metadata` (its files there stay)")


@contextmanager
def _finishing(vm: Vm, to: str, uri: str, log: Log) -> Iterator[None]:
    """Once the VM runs on ``to``: a failure or an interrupt of what is left (undefining the source) says where it is.

    Without this, a source host that stopped answering showed only libvirt's error, and an interrupt only
    "interrupted": the VM defined on both hosts, its out-of-date source still set to start at boot, and a second
    run told to "remove" the one that runs.
    """
    try:
        with sigterm_as_interrupt():
            yield
    except (KvmconfError, libvirt.libvirtError, OSError) as err:
        raise MigrationFailed(f"{vm.name}: moved to {to}, but its last step failed: {err}; it runs on {to}, and"
                              f" {_left_on_source(vm, to, uri)}") from None
    except KeyboardInterrupt:
        log(f"{vm.name}: migration to {to} interrupted at its last step; it runs on {to}, and"
            f" {_left_on_source(vm, to, uri)}")
        raise


def _migrate_cold(vm: Vm, to: str, conns: Connections, dom: libvirt.virDomain, target: Cluster, moved: Vm,
                  moves: Moves, force: bool, shutdown_timeout: float, log: Log) -> libvirt.virDomain:
    """Shut the VM down, copy its files to ``to``, define and start it there (returned); on failure it stays on the
    source."""
    src_run, dst_run = conns.runner(vm.host), conns.runner(to)
    if domains.is_active(dom):
        if force:
            domains.power_off(dom)
            log(f"{vm.name}: powered off on {vm.host}")
        else:
            domains.shutdown(dom)
            log(f"{vm.name}: shutting down on {vm.host} ...")
            # The guest may still act on the request after the run gave up on it: said, so that a VM that goes down
            # a minute later is not a surprise.
            asked = (f"nothing was made on {to}. The guest was asked to shut down (ACPI) and may still do so: check it"
                     f" with `invoke status`, start it with `invoke start` if it went down, or run again with --force"
                     f" to power it off")
            try:
                with sigterm_as_interrupt():
                    down = wait_until(lambda: not domains.is_active(dom), shutdown_timeout, every=0.2)
            except KeyboardInterrupt:
                log(f"{vm.name}: migration to {to} interrupted while it shuts down on {vm.host}; {asked}")
                raise
            if not down:
                raise MigrationFailed(f"{vm.name}: did not shut down on {vm.host} within {shutdown_timeout:g} s;"
                                      f" {asked}")
    with _undone_on_failure(dst_run, f"{vm.name}: migration to {to}", f"the copies on {to} were removed and the VM"
                            f" is still defined (shut off) on {vm.host}: start it there with `invoke start`",
                            log) as made:
        for src, dst in moves.files:
            copy_file(src_run, dst_run, src, dst, made.append, _progress_lines(log, f"{vm.name}: copying {src}"))
            log(f"{vm.name}: copied {src} to {to}:{dst}")
        _drop_bitmaps(vm, to, dst_run, moves.files[0][1], log)
        dst_conn = conns.get(to)
        # Defined as cluster.conf says for the target host, under the VM's own UUID: what provision had not applied yet
        # (no --apply) takes effect now, and is said, as provision would show it.
        xml = domains.with_uuid(Artifacts(target).domain_xml(moved), dom.UUIDString())
        changes = domains.definition_diff(_live_xml(domains.inactive_xml(dom), moves), xml,
                                          domains.machine_aliases(dst_conn), vm.name)
        if changes:
            log(f"{vm.name}: defined on {to} as cluster.conf says, which changes its definition (not applied on"
                f" {vm.host} yet: `invoke provision --apply` would have):")
            for line in changes:
                log(f"    {line}")
        new = domains.define(dst_conn, xml)
        try:
            domains.set_autostart(new, moved.autostart)
            domains.start(new)
            if not wait_until(lambda: new.state()[0] == libvirt.VIR_DOMAIN_RUNNING, 60, every=0.2):
                raise MigrationFailed(f"{vm.name}: defined on {to} but it does not run")
        except BaseException:
            domains.power_off(new)
            domains.undefine(new, keep_nvram=False)
            raise
    return new


def _conf_lines(path: Path) -> list[str]:
    """cluster.conf's lines as they are on disk: a CRLF line keeps its \\r, the first line its BOM."""
    return path.read_bytes().decode("utf-8").split("\n")  # not read_text: it would turn CRLF into LF


def host_line(path: Path, vm: Vm, to: str) -> tuple[str, str]:
    """cluster.conf's line of ``vm`` before and after setting host=``to`` (added when the line has none).

    Both keep the line's own ending and, on line 1, a BOM: the edit changes the host and nothing else.
    """
    old = _conf_lines(path)[vm.line - 1]
    body = old.removesuffix("\r")
    bom = BOM if vm.line == 1 and body.startswith(BOM) else ""
    fields = body.removeprefix(bom).split("\t")
    if fields[0] != vm.name:
        raise KvmconfError(f"{path}:{vm.line} is not {vm.name}'s line any more; set host={to} there by hand")
    if len(fields) < 8:
        fields.append(f"host={to}")
    elif _HOST_WORD.search(fields[7]):
        fields[7] = _HOST_WORD.sub(f"host={to}", fields[7], count=1)
    else:
        fields[7] = f"host={to} {fields[7]}".rstrip()
    return old, bom + "\t".join(fields) + old[len(body):]


def moved_text(path: Path, vm: Vm, to: str) -> str:
    """cluster.conf's text with host=``to`` on the VM's line and every other line as it is."""
    _old, new = host_line(path, vm, to)
    lines = _conf_lines(path)
    lines[vm.line - 1] = new
    return "\n".join(lines)


def edit_host(path: Path, vm: Vm, to: str) -> None:
    """Set host=``to`` on the VM's line of cluster.conf, touching nothing else."""
    replace_text(path, moved_text(path, vm, to))  # keeps the admin's permissions on cluster.conf


def check_moved_cluster(cluster: Cluster, vm: Vm, to: str) -> None:
    """Refuse the move unless cluster.conf with host=``to`` on the VM's line validates as a whole.

    The project's own validation (load_cluster) runs on that text, as ``edit`` would write it, so the
    host-specific checks apply on the target: capacity, cpuset, NUMA node, macvtap/PCI/VF devices, and
    the placement of host=auto VMs below the line. A VM the target cannot take would not start there,
    and the next `make` would refuse cluster.conf.
    """
    path = Path(cluster.source)
    text = moved_text(path, vm, to)
    with tempfile.TemporaryDirectory(prefix="kvmconf-migrate-") as scratch:
        candidate = Path(scratch) / path.name
        candidate.write_text(text)
        try:
            # make also refuses a backed-up VM on a host the Nagios backup check cannot reach: the same rule here.
            backup_targets(load_cluster(candidate, Path(cluster.site.path)))
        except ConfigError as err:
            # Shown as the admin's own file: the line and column are the same there.
            problems = "\n".join(str(p).replace(str(candidate), str(path)) for p in err.problems)
            raise KvmconfError(f"{vm.name}: {to} cannot take it: with host={to} on line {vm.line}, {path} would not"
                               f" validate; nothing was changed:\n{problems}") from None
