"""Write the generated tree so that readers only ever see a whole old or a whole new build/.

The new tree is staged beside build/: files whose content did not change are hard links to the
old ones (same inode, same mtime, so make, rsync and service reloads see no change), changed
files are written fresh, and the two directories are swapped with one renameat2(RENAME_EXCHANGE).
Files no longer generated are simply not in the new tree.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from generators.errors import UsageError

STAMP = ".kvmconf-stamp"  # inside build/: digest of the inputs and the stat of every file written
_STAGING_PREFIX = ".kvmconf-staging-"
_RENAME_EXCHANGE = 2

Tree = Mapping[PurePosixPath, str | bytes]


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
    try:
        stamp = json.loads((build / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("digest") != digest:
        return None
    for name, (size, mtime_ns) in stamp["files"].items():
        try:
            st = os.stat(build / name)
        except OSError:
            return None
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return None
    return len(stamp["files"])


def write_tree(build: Path, tree: Tree, digest: str) -> WriteReport:
    """Make ``build`` hold exactly ``tree``; see the module docstring for how."""
    files = {_check_path(path): _as_bytes(content) for path, content in tree.items()}
    report = WriteReport()
    build = build.absolute()
    if build.exists() and not build.is_dir():
        raise UsageError(f"{build}: exists and is not a directory (expected the build output directory)")
    try:
        build.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{build}: cannot create its parent directory: {err.strerror}") from None
    if not os.access(build.parent, os.W_OK):
        raise UsageError(f"{build}: its directory {build.parent} is not writable")
    with _locked(build):
        _remove_stale_staging(build)
        old_files = set(_walk(build)) if build.is_dir() else set()
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + build.name + "-", dir=build.parent))
        try:
            for path in sorted(files):
                old, new = build / path, staging / path
                new.parent.mkdir(parents=True, exist_ok=True)
                if path in old_files and _same_content(old, files[path]):
                    os.link(old, new)
                    report.unchanged += 1
                else:
                    new.write_bytes(files[path])
                    new.chmod(0o644)
                    report.written.append(path)
            report.removed = sorted(old_files - set(files))
            staging.chmod(0o755)
            if report.written or report.removed or not build.is_dir():
                _swap(staging, build)
            _write_stamp(build, files, digest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report


def _check_path(path: PurePosixPath) -> PurePosixPath:
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == STAMP:
        raise RuntimeError(f"programming error: generator produced a bad path {str(path)!r}")
    return path


def _as_bytes(content: str | bytes) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else content


def _walk(root: Path) -> Iterator[PurePosixPath]:
    for directory, _, names in os.walk(root):
        for name in names:
            relative = PurePosixPath(os.path.relpath(os.path.join(directory, name), root))
            if str(relative) != STAMP:
                yield relative


def _same_content(path: Path, content: bytes) -> bool:
    try:
        if path.stat().st_size != len(content):
            return False
        return path.read_bytes() == content
    except OSError:
        return False


def _swap(staging: Path, build: Path) -> None:
    """Put staging at build's place in one step; the old tree ends up at staging's path."""
    if not build.exists():
        os.rename(staging, build)
        staging.mkdir()  # so the caller's cleanup has something to remove
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd = -100
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(staging), at_fdcwd, os.fsencode(build),
                                           _RENAME_EXCHANGE) == 0:
        return
    code = ctypes.get_errno()
    if renameat2 is not None and code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(code, os.strerror(code), str(build))
    # Filesystems without RENAME_EXCHANGE: two renames, with a moment where build/ is missing.
    old = staging.with_name(staging.name + ".old")
    os.rename(build, old)
    os.rename(staging, build)
    os.rename(old, staging)


def _write_stamp(build: Path, files: Mapping[PurePosixPath, bytes], digest: str) -> None:
    stats = {}
    for path in files:
        st = os.stat(build / path)
        stats[str(path)] = (st.st_size, st.st_mtime_ns)
    content = json.dumps({"digest": digest, "files": stats}, sort_keys=True)
    if _same_content(build / STAMP, content.encode()):
        return  # a no-op build leaves every file of build/ untouched, the stamp too
    temporary = build / (STAMP + ".tmp")
    temporary.write_text(content)
    os.replace(temporary, build / STAMP)


def _remove_stale_staging(build: Path) -> None:
    """A killed earlier run may have left its staging tree; it is ours to remove."""
    for leftover in build.parent.glob(_STAGING_PREFIX + build.name + "-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _locked(build: Path) -> Iterator[None]:
    """Two `make`s at once on the same build/ take turns instead of mixing their trees."""
    lock_path = build.parent / f".{build.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def digest_of(*parts: bytes) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(hashlib.sha256(part).digest())
    return sha.hexdigest()
