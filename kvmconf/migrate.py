"""`invoke migrate`: move a VM to another physical host, cold.

Cold, in an order that never leaves the VM without a working copy: shut the VM down (ACPI; or
power it off with ``force``), copy its disk (and seed ISO) to the target host's paths, define it
there from the generated XML, start it, wait until it runs, and only then undefine it on the
source. The source's disk files stay where they were (the message says where) until the admin
removes them. cluster.conf still says the old ``host=``: the task says which line to change, or
changes it with ``edit``.

Live migration (both hosts up, storage copied while the guest runs) is not done here: it needs
hosts that reach each other's libvirtd and QEMU migration ports, which this tool cannot check.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from generators.model import Cluster, DiskKind, Install, Vm
from generators.paths import disk_path, seed_iso_path
from kvmconf import domains
from kvmconf.connection import Connections
from kvmconf.errors import KvmconfError, UnknownVm
from kvmconf.plan import Artifacts
from kvmconf.runner import Runner

Log = Callable[[str], None]
_HOST_WORD = re.compile(r"(?<!\S)host=\S*")


class MigrationFailed(KvmconfError):
    """A step of the migration failed; the source VM is still defined (the message says what was done)."""


@dataclasses.dataclass(frozen=True)
class Moves:
    """The files a cold migration copies: (source path, target path)."""

    files: tuple[tuple[str, str], ...]


def on_host(cluster: Cluster, vm: Vm, host: str) -> tuple[Cluster, Vm]:
    """The cluster with ``vm`` placed on ``host``: what to define there."""
    moved = dataclasses.replace(vm, host=host, auto_placed=False)
    return dataclasses.replace(cluster, vms=tuple(moved if v.name == vm.name else v for v in cluster.vms)), moved


def files_to_copy(cluster: Cluster, vm: Vm, target: Cluster, moved: Vm) -> Moves:
    pairs = [(disk_path(cluster, vm), disk_path(target, moved))]
    if vm.install is Install.CLOUD:
        pairs.append((seed_iso_path(cluster, vm), seed_iso_path(target, moved)))
    return Moves(tuple(pairs))


def copy_file(source: Runner, target: Runner, src: str, dst: str) -> None:
    """Copy a (sparse) disk file between hosts; to a temporary name first, renamed once complete."""
    tmp = f"{dst}.kvmconf-migrating"
    if source.ssh is None and target.ssh is None:
        target.check(["cp", "--sparse=always", "--", src, tmp])
    elif target.ssh is None:
        target.check(["scp", "-q", "-o", "BatchMode=yes", f"{source.ssh}:{src}", tmp])
    else:  # the source host pushes to the target host (it needs SSH access to it, as the admin has)
        source.check(["scp", "-q", "-o", "BatchMode=yes", src, f"{target.ssh}:{tmp}"])
    target.check(["mv", "-f", "--", tmp, dst])


def _wait(what: str, done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def migrate(cluster: Cluster, name: str, to: str, conns: Connections, force: bool = False,
            shutdown_timeout: float = 120.0, log: Log = print) -> Vm:
    """Move VM ``name`` from its host in cluster.conf to host ``to``; returns the VM as it is now placed."""
    try:
        vm = cluster.vm(name)
    except KeyError:
        raise UnknownVm(f"{name!r} is not a VM of {cluster.source}") from None
    if to not in cluster.site.hosts:
        raise KvmconfError(f"{to!r} is not a host of {cluster.site.path} (expected one of:"
                           f" {', '.join(sorted(cluster.site.hosts))})")
    if to == vm.host:
        raise KvmconfError(f"{name}: cluster.conf places it on {to} already")
    if conns.uri(to) == conns.uri(vm.host):
        raise KvmconfError(f"{name}: {vm.host} and {to} are the same libvirt ({conns.uri(to)}): nothing to move")
    if vm.disk.kind is DiskKind.LVM:
        raise KvmconfError(f"{name}: its disk is an LVM volume; cold migration copies disk files only (create"
                           f" the volume on {to} and copy it with dd, then provision there with --reuse-disk)")
    src_conn, dst_conn = conns.get(vm.host), conns.get(to)
    dom = domains.lookup(src_conn, name)
    if dom is None:
        raise KvmconfError(f"{name}: not defined on {vm.host} ({conns.uri(vm.host)}): nothing to move")
    if domains.lookup(dst_conn, name) is not None:
        raise KvmconfError(f"{name}: a domain of that name is defined on {to} already; remove it first")
    target, moved = on_host(cluster, vm, to)
    moves = files_to_copy(cluster, vm, target, moved)
    src_run, dst_run = conns.runner(vm.host), conns.runner(to)
    in_the_way = dst_run.existing([dst for _, dst in moves.files])
    if in_the_way:
        raise KvmconfError(f"{name}: {', '.join(sorted(in_the_way))} exists on {to} already and is never"
                           " overwritten; nothing was changed")

    if domains.is_active(dom):
        if force:
            domains.power_off(dom)
            log(f"{name}: powered off on {vm.host}")
        else:
            domains.shutdown(dom)
            log(f"{name}: shutting down on {vm.host} ...")
            if not _wait("shutdown", lambda: not domains.is_active(dom), shutdown_timeout):
                raise MigrationFailed(f"{name}: did not shut down within {shutdown_timeout:g} s; it still runs on"
                                      f" {vm.host} (run again with --force to power it off)")
    copied: list[str] = []
    try:
        for src, dst in moves.files:
            copy_file(src_run, dst_run, src, dst)
            copied.append(dst)
            log(f"{name}: copied {src} to {to}:{dst}")
        new = domains.define(dst_conn, Artifacts(target).domain_xml(moved))
        try:
            domains.set_autostart(new, moved.autostart)
            domains.start(new)
            if not _wait("start", lambda: new.state()[0] == libvirt.VIR_DOMAIN_RUNNING, 60):
                raise MigrationFailed(f"{name}: defined on {to} but it does not run")
        except BaseException:
            domains.power_off(new)
            domains.undefine(new, keep_nvram=False)
            raise
    except (KvmconfError, libvirt.libvirtError, OSError) as err:
        for dst in copied:
            dst_run.remove(dst)
        raise MigrationFailed(f"{name}: migration to {to} failed: {err}; the copies on {to} were removed and the"
                              f" VM is still defined (shut off) on {vm.host}: start it there with `invoke start`"
                              ) from None
    log(f"{name}: running on {to}")
    domains.set_autostart(dom, False)
    domains.undefine(dom, keep_nvram=False)
    log(f"{name}: undefined on {vm.host}; its files there are kept: {', '.join(src for src, _ in moves.files)}")
    return moved


def host_line(path: Path, vm: Vm, to: str) -> tuple[str, str]:
    """cluster.conf's line of ``vm`` before and after setting host=``to`` (added when the line has none)."""
    lines = path.read_text().split("\n")
    old = lines[vm.line - 1]
    fields = old.split("\t")
    if fields[0] != vm.name:
        raise KvmconfError(f"{path}:{vm.line} is not {vm.name}'s line any more; set host={to} there by hand")
    if len(fields) < 8:
        fields.append(f"host={to}")
    elif _HOST_WORD.search(fields[7]):
        fields[7] = _HOST_WORD.sub(f"host={to}", fields[7], count=1)
    else:
        fields[7] = f"host={to} {fields[7]}".rstrip()
    return old, "\t".join(fields)


def edit_host(path: Path, vm: Vm, to: str) -> str:
    """Set host=``to`` on the VM's line of cluster.conf, touching nothing else; returns the new line."""
    _old, new = host_line(path, vm, to)
    lines = path.read_text().split("\n")
    lines[vm.line - 1] = new
    tmp = path.with_name(path.name + ".kvmconf-new")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return new
