"""Backup bench: our full and incremental backup vs virtnbdbackup, with `qemu-img convert` as the floor.

One running VM (software emulation, no OS: its CPU halts at once instead of spinning in the BIOS, see
kvmconf/bare_vm.py) with a 2 GiB qcow2 disk holding 1 GiB of data, in a throwaway lab (private
libvirtd in a network namespace; needs root). Side by side in one run, in rounds after a warm-up
round that is shown but not counted (the median counts: this disk's speed varies from second to
second, and with the CPU time the hypervisor gives to other machines, which is printed):
  full:        qemu-img convert -U of the live image (the floor) | ours | virtnbdbackup -l full
  incremental: after writing 20 MiB through the VM's disk device: ours | virtnbdbackup -l inc
and, for reference, two reads of the backup API's point-in-time export (what any backup built on
that API must read): nbdcopy into nothing, and qemu-img convert into a qcow2 file; and the libvirt
calls alone that any incremental with a checkpoint makes (delete the checkpoint before the last,
begin the job with a new checkpoint, end it), on a third VM, copying nothing: the part of an
incremental's time no backup built on libvirt can avoid.
Prints wall-clock seconds and the bytes each backup occupies, and checks the issue's targets. Ours and
the floor are both on the disk when their time stops: ours writes with direct I/O, and qemu-img convert
flushes its output (fdatasync) before it exits.

    .venv/bin/python bench/backup_bench.py [--rounds N] [--warmup N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from statistics import median

import libvirt
import libvirt_qemu

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.validate import load_cluster  # noqa: E402
from kvmconf import bare_vm, connection, lab  # noqa: E402,F401 (connection: libvirt errors are not printed twice)
from kvmconf.backup import qcow2  # noqa: E402
from kvmconf.backup.engine import Settings, backup_vm  # noqa: E402
from kvmconf.backup.libvirt_xml import backup_xml, checkpoint_xml, domain_disks  # noqa: E402

MIB = 1024 * 1024
ROWS = ("full: qemu-img convert", "full: ours", "full: virtnbdbackup -l full", "inc:  ours",
        "inc:  virtnbdbackup -l inc")
# For reference, not targets: what libvirt's backup API itself allows. Any tool built on it reads the
# point-in-time export; reading it into nothing is the fastest such a full can be.
EXPORT_ROWS = ("export: nbdcopy to null:", "export: qemu-img convert")
LIBVIRT_ROW = "inc:  libvirt calls alone"


def quiet(_line: str) -> None:
    pass


def cpu_ticks() -> tuple[int, int]:
    """(all, steal) CPU ticks since boot: steal is the time the hypervisor gave this machine's CPUs to others."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        path.stat().st_blocks * 512


def timed(action: Callable[[], object], uncache: tuple[Path, ...] = ()) -> float:
    """Seconds `action` takes, started from the same state each time: nothing dirty, the disks not cached.

    Otherwise the write-back of an earlier step's output competes for the disk, and a step that
    reads through the page cache (the floor) finds what a previous round read. Only the disk images
    leave the cache: dropping every cache would time loading Python and libraries too.
    """
    subprocess.run(["sync"], check=True)
    for path in uncache:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = time.monotonic()
    action()
    return time.monotonic() - start


def hmp(dom: libvirt.virDomain, io_command: str) -> None:
    """A qemu-io command on the VM's disk device, as the guest's own I/O would do it."""
    command = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{io_command}"'
    out = libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        raise SystemExit(f"qemu-io: {out}")


def hmp_write(dom: libvirt.virDomain, pattern: int, offset: int, length: int) -> None:
    hmp(dom, f"write -P {pattern:#x} {offset} {length}")


def define(conn: libvirt.virConnect, name: str, disk: Path) -> libvirt.virDomain:
    """A running VM with `disk`, and no OS: its CPU halts, as an idle guest's would (see kvmconf/bare_vm.py).

    The disk is attached as kvmconf's own domain XML attaches a qcow2 file, so QEMU reads it through
    the host's page cache, as the floor does; timed() drops the image from that cache before each step.
    """
    dom = conn.defineXML(bare_vm.domain_xml(name, [(disk, "qcow2")], bare_vm.halting_floppy(disk.parent / "halt.img"),
                                            memory_mib=128))
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


def libvirt_calls_alone(dom: libvirt.virDomain, job: Path, round_: int) -> None:
    """What an incremental asks of libvirt, copying nothing: retire the checkpoint before the last, begin a
    pull job from the last one with a new checkpoint, and end the job (its export is never read). The job and
    checkpoint XML are the engine's own."""
    if round_ >= 2:
        dom.checkpointLookupByName(f"ref{round_ - 2}").delete(0)
    job.mkdir(exist_ok=True)
    (job / "vda.scratch").write_bytes(qcow2.plan(2 * 1024 * MIB, []).metadata)  # an empty qcow2, as ours makes
    disks, skipped = domain_disks(dom.XMLDesc(0))
    dom.backupBegin(backup_xml(job / "nbd.sock", job, disks, skipped, f"ref{round_ - 1}" if round_ else None),
                    checkpoint_xml(f"ref{round_}", disks, skipped), libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    dom.abortJob()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds to take the median of (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="rounds run first and not counted (default 1): right after the VMs' 1 GiB was written,"
                             " the disk is still busy with it")
    args = parser.parse_args()
    if shutil.which("virtnbdbackup") is None:
        raise SystemExit("virtnbdbackup is not installed (Debian package virtnbdbackup)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="kvmconf-backup-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    ticks_before = cpu_ticks()
    cluster = load_cluster(ROOT / "tests/fixtures/lab-cluster.conf", ROOT / "tests/fixtures/lab-site.toml")
    the_lab = lab.up(cluster, work / "lab", f"kvmconf-bench-{os.getpid()}", log=quiet)
    try:
        # Identical VMs: virtnbdbackup refuses to run while a checkpoint it did not create exists, and the
        # third one's checkpoints (the libvirt reference row) stay out of both chains.
        conn = libvirt.open(the_lab.uri)
        doms = []
        for which in ("ours", "vnb", "ref"):
            disk = work / f"{which}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "2G"], check=True)
            doms.append(define(conn, f"bench{which}{os.getpid()}", disk))
            for i in range(16):  # 1 GiB of data: 16 x 64 MiB, every other 64 MiB of the disk
                hmp_write(doms[-1], 0x11 + i, i * 128 * MIB, 64 * MIB)
        dom, other, ref = doms
        disk = work / "ours.qcow2"
        (work / "scratch").mkdir()
        subprocess.run(["sync"], check=True)
        rows: dict[str, list[float]] = {name: [] for name in ROWS + EXPORT_ROWS + (LIBVIRT_ROW,)}
        images = (disk, work / "vnb.qcow2", work / "ref.qcow2")
        sizes: dict[str, int] = {}

        def from_export(argv: list[str]) -> None:
            """Run argv on a pull job's export of the VM's disk ({url} in argv), then end the job."""
            job = work / "job"
            job.mkdir(exist_ok=True)
            xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{job}/nbd.sock'/><disks>"
                   f"<disk name='vda' type='file'><scratch file='{job}/vda.scratch'/></disk></disks></domainbackup>")
            dom.backupBegin(xml, None, 0)
            try:
                url = f"nbd+unix:///vda?socket={job}/nbd.sock"
                subprocess.run([a.replace("{url}", url) for a in argv], check=True, stdout=subprocess.DEVNULL)
            finally:
                dom.abortJob()
                shutil.rmtree(job, ignore_errors=True)

        def ours(settings: Settings) -> None:
            outcome = backup_vm(dom, settings, 5, quiet)
            if not outcome.ok:
                raise SystemExit(f"our backup failed: {outcome.error}")

        for r in range(args.warmup + args.rounds):
            # The floor reads the live image (-U): without a flush first it can miss clusters whose
            # metadata QEMU still holds in memory (it copied 768 of 1024 MiB in one run).
            hmp(dom, "flush")
            floor = work / f"floor{r}.qcow2"
            convert = ["qemu-img", "convert", "-U", "-O", "qcow2", str(disk), str(floor)]
            rows["full: qemu-img convert"].append(timed(partial(subprocess.run, convert, check=True), images))
            rows["export: nbdcopy to null:"].append(timed(partial(from_export, ["nbdcopy", "{url}", "null:"]), images))
            via_nbd = work / f"via-nbd{r}.qcow2"
            rows["export: qemu-img convert"].append(timed(partial(from_export, [
                "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "{url}", str(via_nbd)]), images))
            sizes.update({"export: nbdcopy to null:": 0, "export: qemu-img convert": du(via_nbd)})
            via_nbd.unlink()
            # Each round is a new chain: a fresh directory makes our next backup a full.
            settings = Settings(work / f"ours{r}", full_every=5)
            settings.dir.mkdir()  # as `fab kvm-setup` makes [backup] dir: a backup refuses a missing one
            ours_dir, vnb_dir = settings.dir, work / f"vnb{r}"
            rows["full: ours"].append(timed(partial(ours, settings), images))
            rows["full: virtnbdbackup -l full"].append(timed(partial(vnb, the_lab.uri, other.name(), "full", vnb_dir,
                                                                     work / "scratch"), images))
            sizes.update({"full: qemu-img convert": du(floor), "full: ours": du(ours_dir),
                          "full: virtnbdbackup -l full": du(vnb_dir)})
            floor.unlink()

            for d in doms:  # 20 MiB, somewhere new each round
                hmp_write(d, 0x77 + r, (300 + 40 * r) * MIB, 20 * MIB)
            before_ours, before_vnb = du(ours_dir), du(vnb_dir)
            rows["inc:  ours"].append(timed(partial(ours, settings), images))
            rows["inc:  virtnbdbackup -l inc"].append(timed(partial(vnb, the_lab.uri, other.name(), "inc", vnb_dir,
                                                                    work / "scratch"), images))
            sizes.update({"inc:  ours": du(ours_dir) - before_ours,
                          "inc:  virtnbdbackup -l inc": du(vnb_dir) - before_vnb, LIBVIRT_ROW: 0})
            # A 2 GiB disk like the others, so QEMU's bitmaps are as large; round 0 begins its chain.
            rows[LIBVIRT_ROW].append(timed(partial(libvirt_calls_alone, ref, work / "ref-job", r), images))
            shutil.rmtree(work / "ref-job")
        for d in doms:
            d.destroy()
            d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        conn.close()
    finally:
        lab.teardown(the_lab, quiet)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    ticks_after = cpu_ticks()
    steal = (ticks_after[1] - ticks_before[1]) / max(1, ticks_after[0] - ticks_before[0])
    print("backup of a running VM: 2 GiB qcow2 disk, 1 GiB of data; incremental after writing 20 MiB")
    print(f"CPU time the hypervisor took for others (steal) during the run: {steal:.0%} (figures spread with it)")
    print(f"median of {args.rounds} rounds after {args.warmup} not counted (each round: the three fulls, then the two"
          " incrementals)")
    print(f"{'':28} {'seconds':>8} {'stored MiB':>11}   rounds")
    for name in ROWS + EXPORT_ROWS + (LIBVIRT_ROW,):
        if name == EXPORT_ROWS[0]:
            print("for reference, through the backup API's export (the same point-in-time view as ours):")
        if name == LIBVIRT_ROW:
            print("for reference, what an incremental asks of libvirt, copying nothing (its first round is a full):")
        warm, counted = rows[name][:args.warmup], rows[name][args.warmup:]
        print(f"{name:28} {median(counted):8.2f} {sizes[name] / MIB:11.1f}   "
              + "".join(f"({t:.2f}) " for t in warm) + " ".join(f"{t:.2f}" for t in counted))
    floor_s, full_s, vnb_full_s = (median(rows[n][args.warmup:]) for n in ROWS[:3])
    inc_s, vnb_inc_s = (median(rows[n][args.warmup:]) for n in ROWS[3:])
    checks = {
        f"our full within 1.2x of the floor ({full_s / floor_s:.2f}x)": full_s <= 1.2 * floor_s,
        "our full no slower than virtnbdbackup": full_s <= vnb_full_s,
        "our incremental no slower than virtnbdbackup's": inc_s <= vnb_inc_s,
        f"our incremental under 10% of our full's time ({inc_s / full_s:.0%})": inc_s < 0.1 * full_s,
    }
    for text, met in checks.items():
        print(f"{'met' if met else 'MISSED':>6}: {text}")
    libvirt_s = median(rows[LIBVIRT_ROW][max(1, args.warmup):])
    print(f"libvirt's own part of an incremental is {libvirt_s / full_s:.0%} of our full's time,"
          f" {libvirt_s / inc_s:.0%} of our incremental's")
    export_s = median(rows[EXPORT_ROWS[0]][args.warmup:])
    print(f"reading the export alone takes {export_s / floor_s:.2f}x the floor; ours takes {full_s / export_s:.2f}x"
          " the export's own read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
