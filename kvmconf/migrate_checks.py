"""What `invoke migrate` checks before the VM is stopped or anything is made on the target host.

Each check refuses (KvmconfError, "nothing was changed") a move that would otherwise fail midway with the VM
shut down, or succeed with a VM that lost a disk or reads another base image's blocks.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import xml.etree.ElementTree as ET

import libvirt

from generators.model import Cluster, Vm
from kvmconf import disks
from kvmconf.disks import DiskSpec
from kvmconf.errors import CommandFailed, KvmconfError
from kvmconf.plan import missing_folders
from kvmconf.runner import Runner


@dataclasses.dataclass(frozen=True)
class Moves:
    """The files a migration places on the target: (source, target) paths; a live one creates the disk."""

    files: tuple[tuple[str, str], ...]


def check_target(vm: Vm, to: str, dom: libvirt.virDomain, src_run: Runner, dst_run: Runner, moves: Moves,
                 disk: DiskSpec, live: bool, target: Cluster) -> bool:
    """Refuse a move to ``to`` that cannot be made as it should; True when a live one may copy only the overlay.

    The domain's disks are the ones cluster.conf gives it; the target has the base image of an install=cloud overlay
    (for a cold move: the very file, byte for byte), and its disk_dir, with room for the VM's files.
    """
    unknown = _disks_not_moved(dom, moves)
    if unknown:
        raise KvmconfError(f"{vm.name}: its domain on {vm.host} has disks that cluster.conf does not give it:"
                           f" {', '.join(unknown)}; a migration moves only {sources(moves)}, so it would start on {to}"
                           f" without them (cold) or mirror them into whatever is at that path there (live); nothing"
                           f" was changed (make cluster.conf say the disk the VM has, or detach the others)")
    try:
        disks.check_base(dst_run, disk)
        _check_room(vm, to, src_run, dst_run, moves, disk, target)
        if live:
            return _base_there_too(src_run, dst_run, moves.files[0][0], disk.backing)
        _check_same_base(vm, to, src_run, dst_run, moves.files[0][0])
        return False
    except CommandFailed as err:
        raise KvmconfError(f"{err}; nothing was changed") from None


def sources(moves: Moves) -> str:
    return " and ".join(src for src, _ in moves.files)


def allocated(runner: Runner, path: str) -> int:
    """The bytes ``path`` takes on its disk: what a copy sends and writes (a thin file's holes are neither)."""
    # --dereference: a symlinked disk or seed counts as the file it names, as the sending tar sends it.
    blocks, block_size = runner.check(["stat", "--dereference", "--format=%b %B", "--", path]).stdout.split()
    return int(blocks) * int(block_size)


def _disks_not_moved(dom: libvirt.virDomain, moves: Moves) -> list[str]:
    """The domain's disk and CD-ROM files (or devices) that are not among the files the migration moves.

    Only the disk cluster.conf gives the VM (and its seed ISO) is copied or created on the target, under the target's
    paths: a disk an admin attached by hand, or the old disk of a VM whose disk= or disk_dir changed since it was
    defined, would be left out of a cold move's definition, and a live one would mirror it into the same path on the
    target, over whatever file is there. An empty CD-ROM drive has no source and does not count.
    """
    moved = {src for src, _ in moves.files}
    found = []
    for source in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk/source"):
        path = source.get("file") or source.get("dev") or source.get("name")
        if path and path not in moved:
            found.append(path)
    return found


def _check_room(vm: Vm, to: str, src_run: Runner, dst_run: Runner, moves: Moves, disk: DiskSpec,
                target: Cluster) -> None:
    """Refuse a target host without the directory of the VM's files, or without room for them there.

    Checked before the VM is stopped: a cold move found either only when its copy failed, with the VM shut down
    for nothing. A live one's mirror fills the empty disk made there with the data the VM's disk holds.
    """
    directory = posixpath.dirname(moves.files[0][1])  # the seed ISO goes to the same disk_dir
    if not dst_run.existing([posixpath.join(directory, ".")]):
        problem, = missing_folders(to, [disk], target)
        raise KvmconfError(f"{problem}; nothing was changed")
    needed = sum(allocated(src_run, src) for src, _ in moves.files)
    free = int(dst_run.check(["df", "--output=avail", "--block-size=1", "--", directory]).stdout.split()[-1])
    if free < needed:
        raise KvmconfError(f"{vm.name}: {directory} on {to} has {free >> 20} MiB free, and its files take"
                           f" {needed >> 20} MiB on {vm.host} ({sources(moves)}); nothing was changed: make room"
                           f" there first")


def _overlay_base(runner: Runner, disk: str) -> str | None:
    """The base image the header of the qcow2 overlay ``disk`` names (an absolute path); None for a disk without one."""
    info = json.loads(runner.check(["qemu-img", "info", "-U", "--output=json", "--", disk]).stdout)
    return info.get("full-backing-filename") or info.get("backing-filename") or None


def _base_there_too(src_run: Runner, dst_run: Runner, disk: str, backing: str | None) -> bool:
    """Whether a live migration may copy only the overlay ``disk`` (VIR_MIGRATE_NON_SHARED_INC), not its base's data.

    Only when the base its header names is the one the target's new overlay is made on (cluster.conf's cloud_image)
    and the same bytes on both hosts; else libvirt copies the whole chain (NON_SHARED_DISK), as it always did: the
    target's overlay then holds the base's data as well, which takes as much room there and time on the wire.
    """
    base = _overlay_base(src_run, disk)
    if base is None or base != backing:
        return False
    sums = [run.run(["sha256sum", "--", base]) for run in (src_run, dst_run)]
    return all(r.returncode == 0 for r in sums) and sums[0].stdout.split()[:1] == sums[1].stdout.split()[:1]


def _check_same_base(vm: Vm, to: str, src_run: Runner, dst_run: Runner, disk: str) -> None:
    """Refuse a cold move of an overlay whose base image is not the same file, byte for byte, on ``to``.

    The copy keeps the overlay's header, which names its base by path: on the target it reads whatever image is at
    that path. A base refreshed there under the same name (a newer cloud image) would give the VM a disk of old
    blocks over new ones, corrupt without a word. The header's path is the one compared, as cluster.conf's
    cloud_image may have changed since the overlay was made.
    """
    base = _overlay_base(src_run, disk)
    if base is None:
        return
    # sha256sum is in coreutils (Essential): a missing base fails here, named with its host and sha256sum's words.
    sums = [run.check(["sha256sum", "--", base]).stdout.split()[0].decode() for run in (src_run, dst_run)]
    if sums[0] != sums[1]:
        raise KvmconfError(f"{vm.name}: its disk {disk} is an overlay on {base}, and that file on {to} is not the one"
                           f" on {vm.host} (sha256 {sums[1][:16]}... there, {sums[0][:16]}... here): the copy would"
                           f" read the other image's blocks; nothing was changed: put the same base image on {to}"
                           f" first (or use a live migration, which copies the base's data too)")
