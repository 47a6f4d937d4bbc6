"""Domains without an OS, for the backup tests and bench: data disks only, and a CPU that idles.

With nothing bootable, SeaBIOS under software emulation spins in its boot retry loop and keeps a
host CPU at 100%: on the two-core machines the lab runs on, each such VM takes half the machine
from QEMU's NBD server, the backup and the floor alike. These domains boot a floppy whose first
instructions halt the CPU with interrupts off, as an idle OS would, so the VM costs no CPU while it
runs. The floppy is no `device='disk'`, so backups leave it out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

_FLOPPY_SIZE = 1474560  # a 1.44 MB floppy: the size the BIOS recognises
_HALT = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp back to hlt (past an NMI)
_BOOT_SIGNATURE = b"\x55\xaa"  # the last two bytes of a bootable first sector


def halting_floppy(path: Path) -> Path:
    """Write (once) the boot floppy that halts the CPU; `path`."""
    if not path.is_file():
        image = bytearray(_FLOPPY_SIZE)
        image[:len(_HALT)] = _HALT
        image[510:512] = _BOOT_SIGNATURE
        path.write_bytes(bytes(image))
    return path


def domain_xml(name: str, disks: Sequence[tuple[Path, str]], floppy: Path, memory_mib: int = 64,
               agent_channel: bool = False) -> str:
    """A VM definition: `disks` ((path, format) as vda, vdb, ...) attached as kvmconf's own domain XML attaches
    a file disk (templates/domain.xml.j2), booting `floppy` (halting_floppy)."""
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    os_ = ET.SubElement(root, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "boot", dev="fd")
    devices = ET.SubElement(root, "devices")
    for i, (path, fmt) in enumerate(disks):
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt, discard="unmap")
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
    boot = ET.SubElement(devices, "disk", type="file", device="floppy")
    ET.SubElement(boot, "driver", name="qemu", type="raw")
    ET.SubElement(boot, "source", file=str(floppy))
    ET.SubElement(boot, "target", dev="fda", bus="fdc")
    ET.SubElement(boot, "readonly")
    if agent_channel:  # as kvmconf's domains have it; with no OS, no agent ever answers on it
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")
