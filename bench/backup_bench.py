"""Backup bench: our full and incremental backup vs virtnbdbackup, with `qemu-img convert` as the floor.

One running VM (software emulation, no OS) with a 2 GiB qcow2 disk holding 1 GiB of data, in a
throwaway lab (private libvirtd in a network namespace; needs root). Side by side in one run:
  full:        qemu-img convert -U of the live image (the floor) | ours | virtnbdbackup -l full
  incremental: after writing 20 MiB through the VM's disk device: ours | virtnbdbackup -l inc
Prints wall-clock seconds and the bytes each backup occupies, and checks the issue's targets.

    .venv/bin/python bench/backup_bench.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import libvirt_qemu

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.validate import load_cluster  # noqa: E402
from kvmconf import connection, lab  # noqa: E402,F401 (connection: libvirt errors are not printed twice)
from kvmconf.backup.engine import Settings, backup_vm  # noqa: E402

MIB = 1024 * 1024


def quiet(_line: str) -> None:
    pass


def du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        path.stat().st_blocks * 512


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def hmp_write(dom: libvirt.virDomain, pattern: int, offset: int, length: int) -> None:
    command = (f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend'
               f' "write -P {pattern:#x} {offset} {length}"')
    out = libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        raise SystemExit(f"qemu-io: {out}")


def define(conn: libvirt.virConnect, name: str, disk: Path) -> libvirt.virDomain:
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = "128"
    os_ = ET.SubElement(root, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    devices = ET.SubElement(root, "devices")
    element = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type="qcow2", cache="none")
    ET.SubElement(element, "source", file=str(disk))
    ET.SubElement(element, "target", dev="vda", bus="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    dom = conn.defineXML(ET.tostring(root, encoding="unicode"))
    dom.create()
    return dom


def vnb(uri: str, name: str, level: str, out: Path, scratch: Path) -> None:
    # virtnbdbackup 1.9 asks for a user and password for any URI other than qemu:///... or ssh:
    # the same unix socket written as qemu:///system?socket=... passes that test.
    uri = uri.replace("qemu+unix:///", "qemu:///")
    argv = ["virtnbdbackup", "-U", uri, "-d", name, "-l", level, "-o", str(out), "-S", str(scratch), "-n"]
    result = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"virtnbdbackup -l {level} failed:\n{result.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    if shutil.which("virtnbdbackup") is None:
        raise SystemExit("virtnbdbackup is not installed (Debian package virtnbdbackup)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="kvmconf-backup-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = load_cluster(ROOT / "tests/fixtures/lab-cluster.conf", ROOT / "tests/fixtures/lab-site.toml")
    the_lab = lab.up(cluster, work / "lab", f"kvmconf-bench-{os.getpid()}", log=quiet)
    try:
        # Two identical VMs: virtnbdbackup refuses to run while a checkpoint it did not create exists.
        conn = libvirt.open(the_lab.uri)
        doms = []
        for which in ("ours", "vnb"):
            disk = work / f"{which}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "2G"], check=True)
            doms.append(define(conn, f"bench{which}{os.getpid()}", disk))
            for i in range(16):  # 1 GiB of data: 16 x 64 MiB, every other 64 MiB of the disk
                hmp_write(doms[-1], 0x11 + i, i * 128 * MIB, 64 * MIB)
        dom, other = doms
        disk = work / "ours.qcow2"
        settings = Settings(work / "ours", keep=5, full_every=5)
        (work / "vnb").mkdir()
        (work / "scratch").mkdir()
        subprocess.run(["sync"], check=True)

        floor = timed(lambda: subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(disk),
                                              str(work / "floor.qcow2")], check=True))
        outcome = None

        def ours() -> None:
            nonlocal outcome
            outcome = backup_vm(dom, settings, 5, quiet)
            if not outcome.ok:
                raise SystemExit(f"our backup failed: {outcome.error}")

        our_full = timed(ours)
        vnb_full = timed(lambda: vnb(the_lab.uri, other.name(), "full", work / "vnb", work / "scratch"))
        sizes_full = (du(work / "floor.qcow2"), du(work / "ours"), du(work / "vnb"))

        hmp_write(dom, 0x77, 300 * MIB, 20 * MIB)
        hmp_write(other, 0x77, 300 * MIB, 20 * MIB)
        before_ours, before_vnb = du(work / "ours"), du(work / "vnb")
        our_inc = timed(ours)
        vnb_inc = timed(lambda: vnb(the_lab.uri, other.name(), "inc", work / "vnb", work / "scratch"))
        sizes_inc = (du(work / "ours") - before_ours, du(work / "vnb") - before_vnb)
        for d in doms:
            d.destroy()
            d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        conn.close()
    finally:
        lab.teardown(the_lab, quiet)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print("backup of a running VM: 2 GiB qcow2 disk, 1 GiB of data; incremental after writing 20 MiB")
    print(f"{'':28} {'seconds':>8} {'stored MiB':>11}")
    print(f"{'full: qemu-img convert':28} {floor:8.2f} {sizes_full[0] / MIB:11.1f}   (floor)")
    print(f"{'full: ours':28} {our_full:8.2f} {sizes_full[1] / MIB:11.1f}")
    print(f"{'full: virtnbdbackup -l full':28} {vnb_full:8.2f} {sizes_full[2] / MIB:11.1f}")
    print(f"{'inc:  ours':28} {our_inc:8.2f} {sizes_inc[0] / MIB:11.1f}")
    print(f"{'inc:  virtnbdbackup -l inc':28} {vnb_inc:8.2f} {sizes_inc[1] / MIB:11.1f}")
    checks = {
        f"our full within 1.2x of the floor ({our_full / floor:.2f}x)": our_full <= 1.2 * floor,
        "our full no slower than virtnbdbackup": our_full <= vnb_full,
        "our incremental no slower than virtnbdbackup's": our_inc <= vnb_inc,
        f"our incremental under 10% of our full's time ({our_inc / our_full:.0%})": our_inc < 0.1 * our_full,
    }
    for text, met in checks.items():
        print(f"{'met' if met else 'MISSED':>6}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
