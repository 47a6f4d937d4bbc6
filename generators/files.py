"""Replacing a file's content whole: a reader, or the next run after a crash, finds the old or the new file, never half.

One way for every small state and config file kvmconf rewrites (journals, manifests, known_hosts,
the lab's state, the provision server's files, cluster.conf, ~/.ssh/config): write a temporary file
beside the target, then rename it over the target, which the kernel does atomically within one file
system. Text is UTF-8 whatever the locale (cron runs with LANG=C).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
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
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        if flush:
            f.flush()
            os.fsync(f.fileno())


def replace_text(path: Path, text: str, *, flush: bool = False, mode: int = 0o644, errors: str = "strict") -> None:
    """Give `path` the content `text` through a temporary file beside it and a rename.

    The file keeps its permissions (an admin's cluster.conf stays as they set it); a new one gets
    `mode`. `flush` puts the file and its directory entry on disk before returning, for what must
    outlive a power cut (a journal); without it a power cut may lose the new content, but a reader
    never sees half of it. The temporary's name is unique (`.<name>.<random>.new`), so two writers at
    once each publish a whole file, and a failure or Ctrl-C removes it; only a SIGKILL mid-write
    leaves one behind, a dot file. `errors` is the UTF-8 encoder's: "surrogateescape" writes back the bytes of a
    file read with it, whatever they were.
    """
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(path.stat().st_mode)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors=errors) as out:
            os.fchmod(out.fileno(), mode)  # mkstemp's 0600 until here, whatever the umask
            out.write(text)
            if flush:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if flush:
        fsync_path(path.parent)


@contextlib.contextmanager
def exclusively(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created if missing) for the with-block, waiting for any holder.

    For work that two processes must take turns at. The kernel drops the lock when its holder dies, so a
    killed run never blocks the next one.
    """
    with open(lock_file, "a") as lock:  # "a": creating it never truncates what another holder may have written
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
