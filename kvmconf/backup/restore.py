"""Rebuild flat disk images from a restore point's chain, verified, to a directory or in place."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import libvirt

from kvmconf.backup import journal
from kvmconf.backup.engine import our_checkpoints, run_tool
from kvmconf.backup.store import Manifest, VmStore
from kvmconf.errors import KvmconfError

Log = Callable[[str], None]


class RestoreFailed(KvmconfError):
    """The restore could not be done; nothing of the VM was changed."""


def pick(store: VmStore, at: str | None) -> Manifest:
    points = store.points()
    if not points:
        raise RestoreFailed(f"{store.vm}: no restore point in {store.dir}")
    if at is None:
        return points[-1]
    matches = [m for m in points if m.time.startswith(at)]
    if not matches:
        raise RestoreFailed(f"{store.vm}: no restore point {at} (there are: {', '.join(m.time for m in points)})")
    return matches[-1]


def _verify_chain(store: VmStore, manifest: Manifest) -> None:
    for m in store.chain_of(manifest):
        problems = store.verify(m)
        if problems:
            raise RestoreFailed(f"{store.vm}: restore point {m.time} is damaged: {'; '.join(problems)}")


def _rebuild(store: VmStore, manifest: Manifest, out: Path, log: Log) -> list[Path]:
    written = []
    for disk in manifest.disks:
        top = store.point_dir(manifest.time) / disk.file
        target = out if out.suffix and len(manifest.disks) == 1 else out / f"{store.vm}-{disk.dev}.{disk.format}"
        partial = target.with_name(target.name + ".partial")
        run_tool(["qemu-img", "convert", "-f", "qcow2", "-O", disk.format, str(top), str(partial)],
                 error=RestoreFailed)
        compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", disk.format, str(top), str(partial)],
                                  capture_output=True, text=True, check=False)
        if compared.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RestoreFailed(f"{store.vm}: the rebuilt {disk.dev} differs from the backup:"
                                f" {compared.stdout.strip()}")
        partial.rename(target)
        log(f"{store.vm}: {disk.dev} restored from {manifest.time} to {target} (verified with qemu-img compare)")
        written.append(target)
    return written


def restore(store: VmStore, at: str | None, to: Path | None, dom: libvirt.virDomain | None, force: bool,
            log: Log = print) -> list[Path]:
    """Restore the point `at` (default: the newest) to `to`, or over the VM's own disks (shut off, --force)."""
    manifest = pick(store, at)
    with journal.vm_lock(store.dir):
        _verify_chain(store, manifest)
        if to is not None:
            to.mkdir(parents=True, exist_ok=True) if not to.suffix or len(manifest.disks) > 1 else None
            return _rebuild(store, manifest, to, log)
        if dom is None:
            raise RestoreFailed(f"{store.vm}: not defined here: restore with --to PATH")
        if dom.isActive():
            raise RestoreFailed(f"{store.vm}: is running: shut it off first (invoke stop), then restore in place")
        if not force:
            raise RestoreFailed(f"{store.vm}: restoring in place replaces its disks: confirm with --force")
        written = []
        replaced = []
        for disk in manifest.disks:
            source = Path(disk.source)
            if not source.is_file():
                raise RestoreFailed(f"{store.vm}: {source} is not a file: restore {disk.dev} with --to and copy it")
            staged = _rebuild(store, Manifest(**{**manifest.__dict__, "disks": [disk]}),
                              source.with_name(source.name + ".restored"), log)[0]
            kept = source.with_name(f"{source.name}.before-restore-{manifest.time}")
            source.rename(kept)
            staged.rename(source)
            replaced.append(str(kept))
            written.append(source)
        journal.write(store.dir, {"files": replaced}, "replaced.json")
        # The restored images have no bitmaps: drop the checkpoints so the next backup is a new full.
        for cp in our_checkpoints(dom):
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        log(f"{store.vm}: the replaced disks are kept ({', '.join(replaced)}) until the restored VM has started;"
            " the next backup of the running VM removes them")
        return written
