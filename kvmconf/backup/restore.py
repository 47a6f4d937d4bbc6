"""Rebuild flat disk images from a restore point's chain, verified, to a directory or in place."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import libvirt

from generators.files import fsync_path
from kvmconf.backup import journal
from kvmconf.backup.checkpoints import our_checkpoints
from kvmconf.backup.engine import run_tool
from kvmconf.backup.libvirt_xml import domain_disks
from kvmconf.backup.store import POINT_NAME, DiskFile, Manifest, VmStore, dependents
from kvmconf.errors import KvmconfError
from kvmconf.signals import sigterm_as_interrupt

Log = Callable[[str], None]


class RestoreFailed(KvmconfError):
    """The restore could not be done. Its message says what became of the VM's disks: unchanged, except when
    putting them back after a failed swap failed too; the message then names the record of where each is."""


EXAMPLE_TIME = "20261122T192456Z"  # a restore point's name (its UTC time), as the messages show one


def _is_point_prefix(at: str) -> bool:
    """Whether `at` can begin a point's name: completed by the example's rest, it is one (store.POINT_NAME)."""
    return 0 < len(at) <= len(EXAMPLE_TIME) and POINT_NAME.fullmatch(at + EXAMPLE_TIME[len(at):]) is not None


def pick(store: VmStore, at: str | None) -> Manifest:
    """The point `at` names (its time, or a prefix of it that only it has); the newest without `at`."""
    points = store.points()
    if not points and not store.root.is_dir():  # not "no point": they may well be there, on a disk not mounted
        raise RestoreFailed(f"{store.vm}: the [backup] dir {store.root} does not exist (is its filesystem mounted?):"
                            " mount it, or restore from the NAS copies with --nas")
    if not points:
        raise RestoreFailed(f"{store.vm}: no restore point in {store.dir}")
    if at is None:
        return points[-1]
    there_are = f"there are: {', '.join(m.time for m in points)}"
    if not _is_point_prefix(at):
        raise RestoreFailed(f"{store.vm}: --at {at} is not a restore point's time: give the UTC time a point is named"
                            f" by, as {EXAMPLE_TIME}, or a beginning of it that only one point has ({there_are})")
    matches = [m for m in points if m.time.startswith(at)]
    if not matches:
        raise RestoreFailed(f"{store.vm}: no restore point {at} ({there_are})")
    if len(matches) > 1:  # the newest of them may well not be the one meant: the admin says which
        raise RestoreFailed(f"{store.vm}: --at {at} begins {len(matches)} restore points"
                            f" ({', '.join(m.time for m in matches)}): give more of the time, up to the whole of it")
    return matches[0]


def _verify_chain(store: VmStore, manifest: Manifest) -> None:
    for m in store.chain_of(manifest):
        problems = store.verify(m)
        if problems:  # which points are left to restore is what the admin needs next
            later = ", ".join(dependents(store.points(), m.time))
            raise RestoreFailed(f"{store.vm}: restore point {m.time} is damaged: {'; '.join(problems)}: it cannot be"
                                f" restored{f', nor the points built on it ({later})' if later else ''}; restore an"
                                " earlier point or one of a later chain")


def _targets(store: VmStore, manifest: Manifest, out: Path) -> list[Path]:
    """Where --to puts each disk: an existing directory gets <vm>-<dev>.<format> per disk; a path that does not
    exist is the image of a one-disk VM, in a directory that exists. Nothing else is guessed: a mistyped path
    is said, not made (a directory named like an image, or a new tree beside the one meant)."""
    if out.is_dir():
        return [out / f"{store.vm}-{disk.dev}.{disk.format}" for disk in manifest.disks]
    if len(manifest.disks) > 1:
        devs = ", ".join(disk.dev for disk in manifest.disks)
        raise RestoreFailed(f"{store.vm}: has {len(manifest.disks)} disks ({devs}): --to must be an existing"
                            f" directory, which receives one image per disk ({store.vm}-<disk>.<format>);"
                            f" {out} is not a directory")
    if not out.parent.is_dir():
        raise RestoreFailed(f"{store.vm}: --to {out}: {out.parent} is not a directory: --to is an existing directory,"
                            " or a new file in one")
    return [out]


def _rebuild(store: VmStore, manifest: Manifest, targets: list[Path], modes: list[int], progress: bool, log: Log,
             disks: list[Path] | None = None) -> None:
    """Write each disk of `manifest` flat at its target with its mode, verified; an existing target is never
    overwritten. `progress`: qemu-img's own on the terminal, a disk being minutes of silence otherwise.

    `disks`: the VM's disks the targets are staged for (in place), which the log names rather than the targets.
    """
    for disk, target, mode, final in zip(manifest.disks, targets, modes, disks or targets, strict=True):
        top = store.point_dir(manifest.time) / disk.file
        partial = target.with_name(target.name + ".partial")
        if progress:
            sys.stderr.write(f"{store.vm}: {disk.dev} from {manifest.time}:\n")
        try:
            _create_private(partial, mode)
            run_tool(["qemu-img", "convert", *(["-p"] if progress else []), "-f", "qcow2", "-O", disk.format,
                      str(top), str(partial)], show=progress, error=RestoreFailed, on_stderr=True)
            _compare(store, disk, top, partial)
            # qemu-img convert writes its output without flushing (cache mode 'unsafe'): on disk before it is a disk.
            fsync_path(partial)
        except BaseException as err:  # a full filesystem, Ctrl-C, SIGTERM: no half-written image stays behind
            _discard(partial, log)
            if isinstance(err, OSError):  # the target's problem (read-only, no permission), not a bug: no traceback
                raise RestoreFailed(f"{store.vm}: cannot write the restored {disk.dev} to {final}:"
                                    f" {os.fsdecode(err.filename or partial)}: {err.strerror or err}") from None
            raise
        _name(store, disk, partial, target)
        if final == target:
            log(f"{store.vm}: {disk.dev} restored from {manifest.time} to {target} (verified with qemu-img compare)")
        else:  # staged: it becomes the disk once every disk is rebuilt
            log(f"{store.vm}: {disk.dev} of {final} rebuilt from {manifest.time} (verified with qemu-img compare)")


def _create_private(path: Path, mode: int) -> None:
    """`path` made (emptied, if an interrupted restore left it) with `mode` before qemu-img writes it: a restored
    disk holds what the VM's disk held, readable by no one it was not readable by, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is cut by the umask, and an existing file keeps its own
    finally:
        os.close(fd)


def _compare(store: VmStore, disk: DiskFile, top: Path, partial: Path) -> None:
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", disk.format, str(top), str(partial)],
                              capture_output=True, text=True, check=False)
    if compared.returncode != 0:
        raise RestoreFailed(f"{store.vm}: the rebuilt {disk.dev} ({partial}) differs from the backup {top}:"
                            f" {compared.stdout.strip()}")


def _name(store: VmStore, disk: DiskFile, partial: Path, target: Path) -> None:
    """Give the verified image its name, never over a file that appeared there meanwhile."""
    try:
        os.link(partial, target)  # unlike a rename, fails if a file appeared there meanwhile
    except FileExistsError:
        raise RestoreFailed(f"{store.vm}: {target} appeared during the restore and is left as it is; the"
                            f" restored {disk.dev} is {partial}") from None
    except OSError as err:  # a filesystem without hard links: the verified image stays, under its own name
        raise RestoreFailed(f"{store.vm}: cannot give the restored {disk.dev} its name {target} ({err}); it is"
                            f" complete and verified as {partial}: rename it by hand") from None
    partial.unlink()
    fsync_path(target.parent)


def _discard(path: Path, log: Log) -> None:
    """Remove an image this restore began. On a read-only filesystem unlink fails even where there is no file:
    only one that is there and stays is said, and the error that brought us here is the one raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        if path.exists():
            log(f"cannot remove {path} ({err.strerror or err}): remove it by hand")


def _refuse_existing(store: VmStore, targets: list[Path]) -> None:
    existing = [str(t) for t in targets if t.exists() or t.is_symlink()]  # a dangling link's target is a file
    if existing:
        raise RestoreFailed(f"{store.vm}: {', '.join(existing)} exists already and is never overwritten (it may be a"
                            " disk in use): give --to a new path, or remove it first")


def _refuse_moved_disks(store: VmStore, manifest: Manifest, dom: libvirt.virDomain) -> None:
    """In place swaps the paths the restore point recorded: they must still be the VM's disks. One moved since
    (other storage, a migration) may have left its old file, which would be replaced while the VM starts on
    the disk it has now, unrestored."""
    now = {disk.dev: disk for disk in domain_disks(dom.XMLDesc(0))[0]}
    for disk in manifest.disks:
        current = now.get(disk.dev)
        if current is None or (current.path, current.format) != (disk.source, disk.format):
            has = "no such disk" if current is None else f"{current.path} ({current.format})"
            raise RestoreFailed(f"{store.vm}: {disk.dev} was {disk.source} ({disk.format}) in the restore point"
                                f" {manifest.time}, the VM has {has} now: restore with --to and put the image in"
                                " place by hand")


def _kept_name(source: Path, time: str) -> Path:
    """Where the replaced disk is kept: never over an earlier restore's kept disk (the original may be that one)."""
    kept = source.with_name(f"{source.name}.before-restore-{time}")
    n = 1
    while kept.exists():
        n += 1
        kept = source.with_name(f"{source.name}.before-restore-{time}.{n}")
    return kept


@contextmanager
def _locked(store: VmStore, in_place: bool) -> Iterator[None]:
    """The VM's lock in its [backup] dir (`store`), held so that no backup, nor its NAS stage, prunes the points
    this restore reads, or backs up the disks it replaces.

    A store on a read-only filesystem (a backup disk remounted read-only to recover from it) cannot take it and
    needs none: no backup can delete anything there. (Remounted read-write during the restore, a backup could:
    the admin who does that mid-restore is the one lock this cannot be.) Nor does a [backup] dir that is not
    there (its disk lost, when restoring from the NAS copies): backups refuse to run without it. An in-place
    restore records its swap in the store, which must then be there and writable. Any other failure to lock
    is an error.
    """
    if not store.root.is_dir():
        if in_place:
            raise RestoreFailed(f"{store.vm}: the [backup] dir {store.root} does not exist (is its filesystem"
                                " mounted?), and a restore in place records there which disks it replaces, for the"
                                " next backup to remove: mount it (or make it: fab kvm-setup), or restore with --to")
        yield
        return
    if os.statvfs(store.root).f_flag & os.ST_RDONLY:  # root: the VM's own directory may not be there (--nas)
        if in_place:
            raise RestoreFailed(f"{store.vm}: the backup store {store.dir} is read-only, and a restore in place records"
                                " there which disks it swaps: restore with --to, or remount it read-write")
        yield
        return
    with ExitStack() as stack:
        try:
            stack.enter_context(journal.vm_lock(store.dir))
        except OSError as err:
            raise RestoreFailed(f"{store.vm}: cannot lock {store.dir / journal.LOCK} ({err.strerror or err}), which"
                                " keeps backups from deleting the points a restore reads") from None
        yield


def restore(store: VmStore, at: str | None, to: Path | None, dom: libvirt.virDomain | None, force: bool,
            log: Log = print, progress: bool | None = None, home: VmStore | None = None) -> list[Path]:
    """Restore the point `at` (default: the newest) to `to`, or over the VM's own disks (shut off, --force).

    `home` is the VM's store in [backup] dir, where its lock and an in-place restore's record of the disks it
    replaced live: the VM's backups look there. Default: `store`; restoring from the NAS copies, `store` is theirs.

    `to` is an existing directory, which receives <vm>-<disk>.<format> per disk, or, for a one-disk VM, a new file
    in an existing directory. Images restored to `to` are 0600, as the backups; in place each keeps its disk's
    mode. `progress`: qemu-img's own, on stderr's terminal; by default when stderr is one (as `backup` decides).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    manifest = pick(store, at)  # an unknown point is said before the lock makes the VM's backup directory
    if to is not None:
        _refuse_existing(store, _targets(store, manifest, to))  # said at once, not after the chain is verified
    home = home or store
    with sigterm_as_interrupt(), _locked(home, to is None):  # a timeout's or an admin's kill undoes it as Ctrl-C
        manifest = pick(store, at)  # again under the lock: a backup's pruning may have removed the point meanwhile
        if to is None:  # said at once too: verifying reads every byte of the chain, minutes to hours
            _may_replace_disks(store, dom, force)
        _verify_chain(store, manifest)
        if to is not None:
            targets = _targets(store, manifest, to)
            _refuse_existing(store, targets)
            _rebuild(store, manifest, targets, [0o600] * len(targets), progress, log)
            return targets
        dom = _may_replace_disks(store, dom, force)  # again: it may have been started meanwhile
        _undo_unfinished_swap(home, log)
        _refuse_moved_disks(store, manifest, dom)
        sources = [Path(disk.source) for disk in manifest.disks]
        for disk, source in zip(manifest.disks, sources, strict=True):
            if not source.is_file():
                raise RestoreFailed(f"{store.vm}: {source} is not a file: restore {disk.dev} with --to and copy it")
        # Every disk is rebuilt and verified before the first is swapped: a failure leaves the VM as it was.
        staged = [source.with_name(source.name + ".restored") for source in sources]
        for path in staged:
            _discard(path, log)  # kvmconf's own name: an interrupted restore's leftover
        try:
            _rebuild(store, manifest, staged, [source.stat().st_mode & 0o7777 for source in sources], progress, log,
                     sources)
        except BaseException:
            for path in staged:
                _discard(path, log)
            raise
        replaced = _swap_in(home, dom, manifest, sources, staged)
        log(f"{store.vm}: restored from {manifest.time} in place: {', '.join(map(str, sources))}")
        log(f"{store.vm}: the replaced disks are kept ({', '.join(replaced)}) until the restored VM has started;"
            " the next backup of the running VM removes them")
        # The restored images have no bitmaps: drop the checkpoints so the next backup is a new full.
        try:
            for cp in our_checkpoints(dom):
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as err:  # the restore is done; the next backup finds no bitmap and goes full
            log(f"{store.vm}: restored, but its checkpoints could not be dropped ({err.get_error_message()}): the"
                " next backup finds their bitmaps missing and makes a new full")
        return sources


def _may_replace_disks(store: VmStore, dom: libvirt.virDomain | None, force: bool) -> libvirt.virDomain:
    """The VM's domain, when a restore may replace its disks: defined here, shut off, and confirmed with --force."""
    if dom is None:
        raise RestoreFailed(f"{store.vm}: not defined here: restore with --to PATH")
    if dom.isActive():
        raise RestoreFailed(f"{store.vm}: is running: shut it off first (invoke stop), then restore in place")
    if not force:
        raise RestoreFailed(f"{store.vm}: restoring in place replaces its disks: confirm with --force")
    return dom


def _swap_in(store: VmStore, dom: libvirt.virDomain, manifest: Manifest, sources: list[Path],
             staged: list[Path]) -> list[str]:
    """Put the staged images in the disks' places, keeping each disk as it was; all or none of them.

    The kept names are recorded before the first rename, so whatever happens they are found: the next
    backup of the running VM removes them once the swap is whole, and the next restore puts a swap that
    was killed midway back. The VM may have been started while the images were rebuilt (minutes): then
    its disks are open and nothing is swapped.
    """
    kept = [_kept_name(source, manifest.time) for source in sources]
    before = journal.read(store.dir, journal.REPLACED) or {}
    replaced = [*before.get("files", []), *map(str, kept)]
    try:
        if dom.isActive():
            raise RestoreFailed(f"{store.vm}: was started during the restore: nothing was replaced; shut it off"
                                " and restore again")
        # Until the swap is whole, the record says so: a kill (SIGKILL, a power cut) leaves no roll-back behind.
        swap = [[str(source), str(path), str(keep)] for source, path, keep in zip(sources, staged, kept, strict=True)]
        journal.write(store.dir, {"files": replaced, journal.SWAPPING: swap}, journal.REPLACED)
        swapping = ""
        try:
            for disk, source, path, keep in zip(manifest.disks, sources, staged, kept, strict=True):
                swapping = disk.dev
                source.rename(keep)
                path.rename(source)
            for parent in sorted({source.parent for source in sources}):  # the renames on disk before the record
                fsync_path(parent)
            journal.write(store.dir, {"files": replaced}, journal.REPLACED)
        except BaseException as err:
            try:
                _put_back(sources, staged, kept)
            except OSError as undo_err:  # the record stays as it is: it says where each disk is
                raise RestoreFailed(f"{store.vm}: swapping the restored {swapping} in failed ({err}), and putting the"
                                    f" disks back failed too ({undo_err}); {store.dir / journal.REPLACED} records"
                                    " where each disk is: the next restore in place puts them back, and backups keep"
                                    " the replaced ones until then") from undo_err
            if before:
                journal.write(store.dir, before, journal.REPLACED)
            else:
                (store.dir / journal.REPLACED).unlink(missing_ok=True)
            if isinstance(err, OSError):  # a user's problem (a full or read-only filesystem), not a bug: no traceback
                raise RestoreFailed(f"{store.vm}: swapping the restored {swapping} in failed ({err}); every disk is"
                                    " back as it was: nothing was replaced") from err
            raise
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        raise
    return replaced


def _undo_unfinished_swap(store: VmStore, log: Log) -> None:
    """A restore killed while it swapped the disks, or whose roll-back failed, left some swapped: all go back first.

    Whatever the VM wrote since on a swapped one goes too: this restore replaces it anyway.
    """
    entry = journal.read(store.dir, journal.REPLACED)
    if entry is None or journal.SWAPPING not in entry:
        return
    sources, staged, kept = ([Path(row[i]) for row in entry[journal.SWAPPING]] for i in range(3))
    _put_back(sources, staged, kept)
    for path in staged:
        path.unlink(missing_ok=True)
    files = [f for f in entry.get("files", []) if Path(f) not in kept]
    if files:
        journal.write(store.dir, {"files": files}, journal.REPLACED)
    else:
        (store.dir / journal.REPLACED).unlink()
    log(f"{store.vm}: an earlier in-place restore did not finish swapping the disks: put"
        f" {', '.join(map(str, sources))} back as they were before it")


def _put_back(sources: list[Path], staged: list[Path], kept: list[Path]) -> None:
    """Undo a swap from what the files show, not from a record of the renames done: an interrupt that lands
    between a rename and its record would leave a disk under its kept name, recorded nowhere."""
    for source, path, keep in reversed(list(zip(sources, staged, kept, strict=True))):
        if not keep.exists():  # the kept names were free before the swap: this disk was not moved
            continue
        if source.exists() and not path.exists():  # the restored image got to the disk's place: it goes back
            source.rename(path)
        keep.rename(source)
