"""Write the generated tree so that readers only ever see a whole old or a whole new build/.

The new tree is staged beside build/: files whose content did not change are hard links to the
old ones (same inode, same mtime, so make, rsync and service reloads see no change), changed
files are written fresh, and the two directories are swapped with one renameat2(RENAME_EXCHANGE).
Files no longer generated are simply not in the new tree.

The swap replaces the whole folder, so the writer only ever replaces a folder it wrote (one with
its stamp) or an empty one: any other folder is refused before anything is written. A build path
that is a link is followed, and the link's target is swapped (the link stays). A mount point
cannot be renamed, and writing into it file by file would lose the whole-tree swap, so it is
refused too, with the advice to build into a folder inside it.

A stamp inside build/ records the digest of the inputs and, per file, its size, mtime and content
hash: a rebuild with the same inputs only stats the files, and a changed build finds unchanged
files without reading them back. A file edited by hand no longer matches its stamp entry and is
compared (and so regenerated) by content.

The hot loops use plain ``os`` calls on strings: with tens of thousands of files, pathlib's
object overhead was most of the writer's time.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from generators.errors import UsageError
from generators.files import exclusively

STAMP = ".kvmconf-stamp"
_STAGING_PREFIX = ".kvmconf-staging-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

Tree = Mapping[PurePosixPath, str | bytes]
Stamp = dict[str, tuple[int, int, str]]  # path -> (size, mtime_ns, content hash)


@dataclass
class WriteReport:
    written: list[PurePosixPath] = field(default_factory=list)
    unchanged: int = 0
    removed: list[PurePosixPath] = field(default_factory=list)
    skipped: bool = False  # inputs identical to the last build: nothing was rendered or compared

    def summary(self) -> str:
        if self.skipped:
            return f"{self.unchanged} files up to date (inputs unchanged)"
        return f"{len(self.written)} written, {self.unchanged} unchanged, {len(self.removed)} removed"


def is_up_to_date(build: Path, digest: str) -> int | None:
    """The number of files when build/ was made from inputs with this digest and is untouched since."""
    stamp = _read_stamp(str(build))
    if stamp is None or stamp[0] != digest:
        return None
    root = str(build)
    for name, (size, mtime_ns, _) in stamp[1].items():
        try:
            st = os.stat(f"{root}/{name}")
        except OSError:
            return None
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return None
    return len(stamp[1])


def write_tree(build: Path, tree: Tree, digest: str) -> WriteReport:
    """Make ``build`` hold exactly ``tree``; see the module docstring for how."""
    files = {_check_path(path): _as_bytes(content) for path, content in tree.items()}
    build = _check_location(build)
    try:
        return _write_tree(build, files, digest)
    except OSError as err:  # a full disk, a quota, an I/O error: the old build is still whole, and said to be
        raise UsageError(f"{build}: cannot write the new build: {err.strerror or err}; nothing was changed") from None


def _write_tree(build: Path, files: dict[str, bytes], digest: str) -> WriteReport:
    report = WriteReport()
    root = str(build)
    with _locked(build):
        _remove_stale_staging(build)
        old_stamp = (_read_stamp(root) or ("", {}))[1]
        old_files = set(_walk(root)) if build.is_dir() else set()
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX + build.name + "-", dir=build.parent)
        try:
            for directory in sorted({os.path.dirname(path) for path in files} - {""}):
                os.makedirs(f"{staging}/{directory}", exist_ok=True)
            new_stamp: Stamp = {}
            for path in sorted(files):
                content = files[path]
                content_hash = hashlib.blake2b(content, digest_size=16).hexdigest()
                old = f"{root}/{path}"
                if path in old_files and (st := _unchanged(old, content, content_hash, old_stamp.get(path))):
                    os.link(old, f"{staging}/{path}")
                    new_stamp[path] = (st.st_size, st.st_mtime_ns, content_hash)
                    report.unchanged += 1
                else:
                    st = _write_new(f"{staging}/{path}", content)
                    new_stamp[path] = (st.st_size, st.st_mtime_ns, content_hash)
                    report.written.append(PurePosixPath(path))
            report.removed = [PurePosixPath(p) for p in sorted(old_files - set(files))]
            os.chmod(staging, 0o755)
            if report.written or report.removed or not build.is_dir():
                # Into the new tree, before the swap: a build swapped in without its stamp would be refused by
                # every later run as a folder kvmconf did not write.
                _write_stamp(staging, digest, new_stamp)
                _swap(staging, build)
            else:
                _write_stamp(root, digest, new_stamp)
        finally:
            _remove(staging)
    return report


def _check_location(given: Path) -> Path:
    """The folder to write, absolute and with links followed; a UsageError if it is not ours to replace."""
    try:
        build = given.absolute().resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a link loop, before Python 3.13
        raise UsageError(f"{given}: cannot follow its links: {err}") from None
    shown = f"{given} (a link to {build})" if given.is_symlink() else str(build)
    if build.exists() and not build.is_dir():
        raise UsageError(f"{shown}: exists and is not a directory (expected the build output directory)")
    if build.is_dir():
        if _holds_other_files(build):
            raise UsageError(
                f"{shown}: not a build folder kvmconf wrote (it is not empty and has no {STAMP});"
                f" replacing it would delete its files, so nothing was written. Give --build a new or empty"
                f" folder (e.g. {build / 'build'}), or remove this one first if it only holds an old build")
        if os.path.ismount(build):
            raise UsageError(_mount_point_message(shown, build))
    try:
        build.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{build}: cannot create its parent directory: {err.strerror}") from None
    if not os.access(build.parent, os.W_OK):
        raise UsageError(f"{build}: its directory {build.parent} is not writable")
    return build


def _holds_other_files(build: Path) -> bool:
    """Whether build is a folder kvmconf did not write: one with files but no stamp."""
    if os.path.lexists(f"{build}/{STAMP}"):
        return False
    with os.scandir(build) as entries:
        return any(True for _ in entries)


def _mount_point_message(shown: str, build: Path) -> str:
    return (f"{shown}: is a mount point, which cannot be swapped for the new build (a rename cannot move a"
            f" mount point); nothing was changed. Give --build a folder inside it (e.g. {build / 'build'})")


def _check_path(path: PurePosixPath) -> str:
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == STAMP:
        raise RuntimeError(f"programming error: generator produced a bad path {str(path)!r}")
    return str(path)


def _as_bytes(content: str | bytes) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else content


def _walk(root: str) -> Iterator[str]:
    for directory, _, names in os.walk(root):
        relative = os.path.relpath(directory, root)
        for name in names:
            path = name if relative == "." else f"{relative}/{name}"
            if path != STAMP:
                yield path


def _unchanged(
    path: str, content: bytes, content_hash: str, recorded: tuple[int, int, str] | None
) -> os.stat_result | None:
    """The old file's stat when it already holds ``content``, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size != len(content):
        return None
    if recorded is not None and recorded[:2] == (st.st_size, st.st_mtime_ns):
        return st if recorded[2] == content_hash else None  # trusted: untouched since we wrote it
    with open(path, "rb") as old:  # edited by hand, or no stamp: compare by content
        return st if old.read() == content else None


def _write_new(path: str, content: bytes) -> os.stat_result:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, content) if len(content) < 2**30 else _write_all(fd, content)
        os.fchmod(fd, 0o644)  # whatever the umask, generated files are world-readable (dnsmasq's TFTP needs it)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view):]


def _swap(staging: str, build: Path) -> None:
    """Put staging at build's place in one step; the old tree ends up at staging's path."""
    target = str(build)
    if not build.exists():
        os.rename(staging, target)
        os.mkdir(staging)  # so the caller's cleanup has something to remove
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target),
                                           _RENAME_EXCHANGE) == 0:
        return
    code = errno.ENOSYS if renameat2 is None else ctypes.get_errno()
    if code == errno.EBUSY:  # a bind mount of the same filesystem, which os.path.ismount does not see
        raise UsageError(_mount_point_message(target, build))
    if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(code, os.strerror(code), target)
    # Filesystems without RENAME_EXCHANGE: two renames, with a moment where build/ is missing.
    old = staging + ".old"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)  # the old build back in place before the error is said
        raise
    os.rename(old, staging)


def _read_stamp(root: str) -> tuple[str, Stamp] | None:
    try:
        with open(f"{root}/{STAMP}") as stamp_file:
            data = json.load(stamp_file)
        return data["digest"], {path: tuple(entry) for path, entry in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_stamp(root: str, digest: str, files: Stamp) -> None:
    content = json.dumps({"digest": digest, "files": files}, sort_keys=True)
    path = f"{root}/{STAMP}"
    try:
        with open(path) as current:
            if current.read() == content:
                return  # a no-op build leaves every file of build/ untouched, the stamp too
    except OSError:
        pass
    try:
        with open(path + ".tmp", "w") as temporary:
            temporary.write(content)
        os.replace(path + ".tmp", path)
    except OSError:
        with suppress(FileNotFoundError):
            os.unlink(path + ".tmp")  # else the next build would count it as a file of its own to remove
        raise


def _remove_stale_staging(build: Path) -> None:
    """A killed earlier run may have left its staging tree; it is ours to remove."""
    for leftover in build.parent.glob(_STAGING_PREFIX + build.name + "-*"):
        _remove(str(leftover))


def _remove(path: str) -> None:
    """Remove a staging tree, or a link left in its place: rmtree refuses links (silently, ignoring errors)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            os.unlink(path)


def _locked(build: Path) -> AbstractContextManager[None]:
    """Two `make`s at once on the same build/ take turns instead of mixing their trees."""
    return exclusively(build.parent / f".{build.name}.lock")


def digest_of(*parts: bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(hashlib.sha256(part).digest())
    return sha.hexdigest()
