"""A VM's primary disk on its physical host: thin qcow2, qcow2 overlay on a cloud image, raw, or LVM.

Paths come from ``generators.paths`` (the domain XML uses the same function), sizes from
cluster.conf. A disk is never overwritten: :func:`create` refuses when something is already at
the path, even if it appeared after the plan was made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from generators.model import Cluster, DiskKind, Install, Vm
from generators.paths import disk_path, lvm_volume_name
from kvmconf.errors import CommandFailed, DiskExists
from kvmconf.runner import Runner, describe_failure, fresh_temporary

GIB = 1024**3


@dataclass(frozen=True)
class DiskSpec:
    """What provisioning creates for one VM (and what ``destroy --purge`` removes)."""

    vm: str
    path: str
    kind: DiskKind
    size_gb: int
    backing: str | None = None  # base image of an install=cloud overlay
    volume_group: str | None = None  # for LVM: `lvcreate -n <lv_name> <volume_group>`
    lv_name: str | None = None

    def describe(self) -> str:
        if self.kind is DiskKind.LVM:
            return f"LVM volume {self.path} ({self.size_gb} GB)"
        if self.backing:
            return f"qcow2 overlay {self.path} ({self.size_gb} GB) on {self.backing}"
        return f"{self.kind} disk {self.path} ({self.size_gb} GB, thin)"


def disk_spec(cluster: Cluster, vm: Vm) -> DiskSpec:
    backing = None
    if vm.install is Install.CLOUD and vm.disk.kind is DiskKind.QCOW2:
        # An overlay, not a copy: creating it costs the same for a 1 GB and a 20 GB base image.
        backing = cluster.os_of(vm).cloud_image
    lv_name = lvm_volume_name(vm) if vm.disk.kind is DiskKind.LVM else None
    return DiskSpec(vm.name, disk_path(cluster, vm), vm.disk.kind, vm.disk.size_gb, backing, vm.disk.volume_group,
                    lv_name)


def lvcreate_argv(disk: DiskSpec) -> list[str]:
    """The one lvcreate call kvmconf makes (a test asserts it: CI machines have no device-mapper)."""
    assert disk.volume_group and disk.lv_name, "programming error: an LVM disk without a volume group"
    return ["lvcreate", "--yes", "-n", disk.lv_name, "-L", f"{disk.size_gb}G", disk.volume_group]


def lvremove_argv(disk: DiskSpec) -> list[str]:
    assert disk.volume_group and disk.lv_name, "programming error: an LVM disk without a volume group"
    return ["lvremove", "--yes", f"{disk.volume_group}/{disk.lv_name}"]


def missing_volume_groups(runner: Runner, host: str, to_create: list[DiskSpec]) -> list[str]:
    """Problems with the volume groups LVM disks would be created in, found before anything is created."""
    needed: dict[str, list[DiskSpec]] = {}
    for disk in to_create:
        if disk.kind is DiskKind.LVM and disk.volume_group:
            needed.setdefault(disk.volume_group, []).append(disk)
    problems = []
    for vg, volumes in sorted(needed.items()):
        vms = ", ".join(disk.vm for disk in volumes)
        result = runner.run(["vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_name,vg_free", vg])
        if result.returncode != 0:
            why = (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1].strip()
            problems.append(f"{vms}: volume group {vg} is not usable on {host} ({why}); create it there"
                            " or change disk=lvm:<vg> in cluster.conf")
            continue
        # lvcreate would fail for want of space only once the run has made (and then undoes) the VMs before: said now.
        fields = result.stdout.decode(errors="replace").split()
        free = int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else None
        size = sum(disk.size_gb for disk in volumes)
        if free is not None and size * GIB > free:
            their = "its new volume needs" if len(volumes) == 1 else "their new volumes need"
            problems.append(f"{vms}: volume group {vg} on {host} has {free / GIB:.1f} GB free, and {their} {size} GB;"
                            " free space there (vgextend), or give less disk or another disk=lvm:<vg> in cluster.conf")
    return problems


def virtual_sizes(runner: Runner, paths: Sequence[str]) -> dict[str, int]:
    """The virtual size in bytes of each of ``paths`` that qemu-img can read, in one command on the host."""
    if not paths:
        return {}
    # One line of JSON per path (empty when qemu-img cannot read it); -U: a running VM holds a lock on its disk.
    script = 'for p in "$@"; do qemu-img info -U --output=json "$p" 2>/dev/null | tr -d "\\n"; echo; done'
    lines = runner.check(["sh", "-c", script, "sh", *paths]).stdout.decode().split("\n")
    sizes = {}
    for path, line in zip(paths, lines, strict=False):
        try:
            sizes[path] = int(json.loads(line)["virtual-size"])
        except (ValueError, KeyError, TypeError):
            continue  # not readable: what the VM's start or backup will say, not a plan's business
    return sizes


def exists(runner: Runner, disk: DiskSpec) -> bool:
    return runner.exists(disk.path)


def _base_info(runner: Runner, backing: str, vms: str, where: str = "") -> tuple[str, int]:
    """The base image's format and virtual size in bytes, for an overlay on it of ``vms`` (named in an error, with
    the host ``where``, by default the runner's)."""
    # -U: the base is shared by running VMs, which hold a lock on it; we only read its header.
    result = runner.run(["qemu-img", "info", "-U", "--output=json", backing])
    if result.returncode != 0:
        their = "its install=cloud overlay" if "," not in vms else "their install=cloud overlays"
        raise CommandFailed(f"{vms}: base image {backing} for {their} is not usable on"
                            f" {where or runner.where} (put the OS's cloud image there, or fix cloud_image in"
                            " site.toml): " + describe_failure(runner.where, ["qemu-img", "info", backing], result))
    info = json.loads(result.stdout)
    return str(info["format"]), int(info["virtual-size"])


def _smaller_than_base(disk: DiskSpec, base_size: int) -> str | None:
    if base_size <= disk.size_gb * GIB:
        return None
    return (f"{disk.vm}: disk size {disk.size_gb} GB is smaller than its base image {disk.backing}"
            f" ({base_size / GIB:.1f} GB); give it at least {-(-base_size // GIB)} GB in cluster.conf")


def base_image_problems(runner: Runner, host: str, to_create: list[DiskSpec]) -> list[str]:
    """Problems with the base images install=cloud overlays would be made on, found before anything is created:
    one command per base image, however many VMs use it."""
    by_base: dict[str, list[DiskSpec]] = {}
    for disk in to_create:
        if disk.backing:
            by_base.setdefault(disk.backing, []).append(disk)
    problems = []
    for backing, using in sorted(by_base.items()):
        try:
            _fmt, size = _base_info(runner, backing, ", ".join(d.vm for d in using), host)
        except CommandFailed as err:
            problems.append(str(err))
            continue
        problems += [why for disk in using if (why := _smaller_than_base(disk, size))]
    return problems


def check_base(runner: Runner, disk: DiskSpec) -> None:
    """Raise :class:`CommandFailed` unless the base image of an install=cloud overlay is usable on ``runner``'s host.

    For a copied overlay (a cold migration), whose header names the base: checked before the VM is stopped.
    """
    if disk.backing:
        _base_info(runner, disk.backing, disk.vm)


def create(runner: Runner, disk: DiskSpec, placed: Callable[[str], None] = lambda _path: None,
           size_bytes: int | None = None) -> None:
    """Create the disk; raise :class:`DiskExists` if something is at its path, CommandFailed if the tool fails.

    ``placed(disk.path)`` is called once the disk is there (see :func:`make_new`); not for an LVM volume,
    which no file clean-up could remove. ``size_bytes``, for a disk file, is its size instead of cluster.conf's:
    a live migration's target must be the size the VM's disk is now, which cluster.conf may no longer say.
    """
    if disk.kind is DiskKind.LVM:
        # lvcreate itself refuses an existing name, so there is no window for an overwrite here.
        runner.check(lvcreate_argv(disk))
        return
    size = f"{disk.size_gb}G" if size_bytes is None else str(size_bytes)
    if disk.backing:
        fmt, base_size = _base_info(runner, disk.backing, disk.vm)
        if size_bytes is None and (too_small := _smaller_than_base(disk, base_size)):
            raise CommandFailed(too_small)
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", disk.backing]
    elif disk.kind is DiskKind.QCOW2:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=off"]
    else:
        argv = ["qemu-img", "create", "-q", "-f", "raw"]  # sparse: allocated as the guest writes
    # qemu-img truncates an existing file: it writes a temporary that make_new links into place.
    if not make_new(runner, disk.path, "kvmconf-new", lambda tmp: runner.check([*argv, tmp, size]), placed):
        raise DiskExists(already_there(disk))


def make_new(runner: Runner, path: str, suffix: str, write: Callable[[str], object],
             placed: Callable[[str], None] = lambda _path: None) -> bool:
    """Make the file ``path`` on ``runner``'s host, never over one: False (and nothing made) if one is there.

    ``write(tmp)`` makes it under a temporary name beside it, unique to this run (:func:`temporary_beside`, with
    ``suffix``), so two runs on one path never write into the same file; then a hard link puts it in place:
    link(2) fails if the path exists, which closes the gap between a caller's check and now (a rename would
    replace that file), and of two runs only one makes the file.
    ``placed(path)`` is called as soon as the link is made, before anything else can be interrupted, so that
    a caller's clean-up lists the file only once it is this run's. The temporary is removed in every case,
    also when ``write`` fails or is interrupted (a half-written disk can be gigabytes); what a killed run of
    this machine left is removed first.
    """
    tmp = fresh_temporary(runner, path, suffix)
    try:
        write(tmp)
        try:
            linked = runner.run(["ln", "-T", "--", tmp, path])
        except BaseException:
            # Interrupted as ln ran: the link may be made all the same, and is this run's if it is the temporary.
            if runner.run(["test", tmp, "-ef", path]).returncode == 0:
                placed(path)
            raise
        if linked.returncode == 0:
            placed(path)
    finally:
        runner.remove(tmp)
    if linked.returncode == 0:
        return True
    if runner.exists(path):
        return False
    raise CommandFailed(describe_failure(runner.where, ["ln", tmp, path], linked))


def remove(runner: Runner, disk: DiskSpec) -> None:
    if disk.kind is DiskKind.LVM:
        runner.check(lvremove_argv(disk))
    else:
        runner.remove(disk.path)


def already_there(disk: DiskSpec) -> str:
    return (f"{disk.vm}: its disk {disk.path} already exists and is never overwritten; attach it as it is with"
            f" --reuse-disk, or remove it with `invoke destroy --vm {disk.vm} --purge` if it is a leftover")
