"""Replacing a file's content whole: a reader, or the next run after a crash, finds the old or the new file, never half.

One way for every small state and config file kvmconf rewrites (journals, manifests, known_hosts,
the lab's state): write a temporary file beside the target, then rename it over the target, which
the kernel does atomically within one file system.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, text: str, *, flush: bool = False, mode: int = 0o666) -> None:
    """Create or truncate `path` with `text` (`mode` before the umask, for a new file); `flush`: on disk on return."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        if flush:
            f.flush()
            os.fsync(f.fileno())


def replace_text(path: Path, text: str, *, flush: bool = False, mode: int | None = None) -> None:
    """Give `path` the content `text` through `.<name>.new` beside it and a rename.

    The file keeps its permissions (an admin's cluster.conf stays as they set it); a new one gets
    `mode`, or the umask's default. `flush` puts the file and its directory entry on disk before
    returning, for what must outlive a power cut (a journal); without it a power cut may lose the
    new content, but a killed process never leaves half of it. The temporary name is fixed, so a
    run killed mid-write leaves nothing that the next write does not reuse; callers that may write
    the same file at once hold a lock.
    """
    tmp = path.with_name(f".{path.name}.new")
    keep: int | None
    try:
        keep = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        keep = mode
    tmp.unlink(missing_ok=True)  # a killed run's leftover, perhaps with other permissions
    # Owner-only until the content is complete and the mode set: the file may be private (known_hosts' 0600 kin).
    write_new(tmp, text, flush=flush, mode=0o600 if keep is not None else 0o666)
    if keep is not None:
        tmp.chmod(keep)
    tmp.replace(path)
    if flush:
        fsync_path(path.parent)
