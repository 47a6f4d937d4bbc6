"""The XML the backup needs from and for libvirt: a domain's disks, backup and checkpoint definitions.

Built with ElementTree (never by string formatting) from the forms verified on libvirt 9.0 / QEMU 7.2:
pull mode with a unix-socket NBD server and a scratch file per disk, raw disks with backupmode='full'
and checkpoint='no' (libvirt refuses a checkpoint on raw storage), see shared/reference/backup-notes.md
§7.2-7.3.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VmDisk:
    dev: str  # target dev, e.g. vda
    path: str  # the image file or block device
    format: str  # driver type: qcow2, raw

    @property
    def tracked(self) -> bool:
        """Only qcow2 can carry the dirty bitmap of a checkpoint; anything else is copied whole every time."""
        return self.format == "qcow2"


def domain_disks(xml: str) -> tuple[list[VmDisk], list[str]]:
    """The backed-up disks (device='disk' with a file or block source) and the devs to leave out (cdroms, ...)."""
    disks: list[VmDisk] = []
    skipped: list[str] = []
    for disk, dev in _targets(xml):
        path = _backed_up_from(disk)
        if path is None:
            skipped.append(dev)
            continue
        driver = disk.find("driver")
        disks.append(VmDisk(dev, path, "raw" if driver is None else driver.get("type", "raw")))
    return disks, skipped


def left_out(xml: str) -> list[str]:
    """A note per disk (device='disk', not a cdrom) that a point leaves out, its source being no file or block device
    (a storage pool's volume, a network disk): the run's line says it, else a restore would be found to lack it."""
    return [f"{dev} is NOT in this point: a disk of type '{disk.get('type')}' (only disks of type 'file' or 'block',"
            " with a source, are backed up): back it up another way, or attach it as its file or block device"
            for disk, dev in _targets(xml) if disk.get("device", "disk") == "disk" and _backed_up_from(disk) is None]


def _targets(xml: str) -> list[tuple[ET.Element, str]]:
    """The domain's disk elements that have a target, with its dev."""
    return [(disk, target.get("dev", "")) for disk in ET.fromstring(xml).iterfind("./devices/disk")
            if (target := disk.find("target")) is not None]


def _backed_up_from(disk: ET.Element) -> str | None:
    """The file or block device a disk element is backed up from; None for one left out."""
    if disk.get("device", "disk") != "disk" or disk.get("type") not in ("file", "block"):
        return None
    source = disk.find("source")
    return None if source is None else source.get("file") or source.get("dev")


def backup_socket(xml: str) -> str | None:
    """The unix socket a pull-mode backup job's XML (backupGetXMLDesc) exports on; None for other jobs."""
    server = ET.fromstring(xml).find("server")
    return None if server is None or server.get("transport") != "unix" else server.get("socket")


def backup_xml(socket: Path, scratch_dir: Path, disks: list[VmDisk], skipped: list[str],
               incremental: str | None) -> str:
    """A pull-mode job: QEMU exports each disk (export name = its dev) over NBD on `socket`.

    QEMU copies a block to the disk's scratch file before the guest overwrites it, so the export
    stays at the job's point in time. libvirt 9.0 needs the scratch file named (it has no default);
    pull_job.py creates them itself (REUSE_EXTERNAL) as <scratch_dir>/<dev>.scratch.
    """
    root = ET.Element("domainbackup", mode="pull")
    if incremental is not None:
        ET.SubElement(root, "incremental").text = incremental
    ET.SubElement(root, "server", transport="unix", socket=str(socket))
    elements = ET.SubElement(root, "disks")
    for disk in disks:
        attributes = {"name": disk.dev, "backup": "yes", "type": "file"}
        if incremental is not None and not disk.tracked:
            attributes["backupmode"] = "full"  # raw/LVM: a whole copy in the same point-in-time job
        element = ET.SubElement(elements, "disk", attributes)
        ET.SubElement(element, "scratch", file=str(scratch_dir / f"{disk.dev}.scratch"))
    for dev in skipped:
        ET.SubElement(elements, "disk", name=dev, backup="no")
    return ET.tostring(root, encoding="unicode")


def dirty_context(disk: VmDisk) -> str:
    """The NBD meta context of an incremental job's dirty blocks for this disk (libvirt names the bitmap)."""
    return f"qemu:dirty-bitmap:backup-{disk.dev}"


def has_guest_agent(xml: str) -> bool:
    """Whether the domain has the guest agent's channel (without it a freeze cannot even be asked for)."""
    return ET.fromstring(xml).find("./devices/channel/target[@name='org.qemu.guest_agent.0']") is not None


def qemu_owner(xml: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as (the live XML's DAC label, e.g. '+64055:+994'), None if not said."""
    for seclabel in ET.fromstring(xml).iterfind("./seclabel[@model='dac']"):
        label = seclabel.findtext("label")
        if label:
            uid, _, gid = label.replace("+", "").partition(":")
            if uid.isdigit() and gid.isdigit():
                return int(uid), int(gid)
    return None


def checkpoint_xml(name: str, disks: list[VmDisk], skipped: list[str]) -> str:
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = "kvmconf backup"
    elements = ET.SubElement(root, "disks")
    for disk in disks:
        ET.SubElement(elements, "disk", name=disk.dev, checkpoint="bitmap" if disk.tracked else "no")
    for dev in skipped:
        ET.SubElement(elements, "disk", name=dev, checkpoint="no")
    return ET.tostring(root, encoding="unicode")
