"""kvmconf's libvirt checkpoints: one per point of a running VM, named CHECKPOINT_PREFIX + the point's time.

A checkpoint's bitmaps record the blocks written since it was made: the next incremental copies those. Only the
newest point's checkpoint is needed; older ones keep bitmaps up to date for nobody and are retired.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import libvirt

from kvmconf.backup.libvirt_xml import VmDisk
from kvmconf.backup.store import Manifest

Log = Callable[[str], None]

CHECKPOINT_PREFIX = "kvmconf-"


def our_checkpoints(dom: libvirt.virDomain) -> list[libvirt.virDomainCheckpoint]:
    return [cp for cp in dom.listAllCheckpoints() if cp.getName().startswith(CHECKPOINT_PREFIX)]


def delete_checkpoint(dom: libvirt.virDomain, name: str, disks: list[VmDisk], log: Log) -> bool:
    """Delete one of our checkpoints, also when its bitmap is broken or the domain is shut off; False if absent."""
    try:
        cp = dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return False
    try:
        cp.delete(0)
        return True
    except libvirt.libvirtError as err:
        log(f"{dom.name()}: checkpoint {name}: {err.get_error_message()}; removing its metadata only")
    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    if not dom.isActive():
        # The bitmap stays in the qcow2 images: remove it offline so it never collects dirty blocks for nobody.
        # Only this bitmap, named after our checkpoint: the images' data and other bitmaps are not touched.
        for disk in disks:
            if disk.tracked:
                removed = subprocess.run(["qemu-img", "bitmap", "--remove", disk.path, name], capture_output=True,
                                         text=True, check=False)
                if removed.returncode != 0:  # it keeps recording writes, harmlessly: said, not fatal
                    log(f"{dom.name()}: could not remove bitmap {name} from {disk.path}:"
                        f" {removed.stderr.strip() or 'exit status ' + str(removed.returncode)}")
    return True


def retire_checkpoints(dom: libvirt.virDomain, checkpoints: list[str], parent: Manifest | None, disks: list[VmDisk],
                        log: Log) -> None:
    """Delete our checkpoints other than the one this run starts from: they keep bitmaps up to date for nobody.

    Done before the job: a delete takes ~2.5 ms then, while during a job QEMU first drains the reads
    in flight (stalls of up to 30 ms measured) and after it libvirt makes the delete wait for the job's
    teardown. The parent's checkpoint is kept until the next run, so a failed run is still followed
    by an incremental.
    """
    keep = None if parent is None else parent.checkpoint
    for name in checkpoints:
        if name != keep:
            delete_checkpoint(dom, name, disks, log)
