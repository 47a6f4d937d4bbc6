"""`python -m generators.ssh_include --build BUILD --config ~/.ssh/config`: include build/ssh/config.

Puts `Include <absolute path of BUILD/ssh/config>` on the first line of the user's ssh config, once:
ssh uses the first value it finds for each option, and an Include below a `Host` line would only
apply inside that block, so the line must come before the user's own blocks. One already above
them stays where it is (see updated_text). Every other line of the file is kept as it is. A second
run changes nothing (not even the mtime); a change is written to a temporary file beside the config
and renamed over it, so ssh never reads half a file. A symlinked config (dotfile managers) is
written through to its target, keeping the link; a read-only one is refused, naming the line to
add by hand, and so is root writing another user's config.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import stat
import sys
from pathlib import Path

from generators import locations
from generators.files import replace_text

NEW_FILE_MODE = 0o600  # ssh refuses a config that others can write; keep it private like ~/.ssh
SSH_DIR_MODE = 0o700


class IncludeError(Exception):
    """A problem the user has to fix; main() prints it and exits 1."""


def include_line(included: Path) -> str:
    """The Include directive for ``included`` (absolute), quoted when the path has blanks."""
    text = str(included)
    if '"' in text or any(ord(char) < 0x20 for char in text):
        raise IncludeError(f"{text!r}: cannot be written in an ssh Include line (quote or control character)")
    if any(char.isspace() for char in text):
        text = f'"{text}"'
    return f"Include {text}\n"


def _starts_a_block(line: str) -> bool:
    """Whether ssh reads ``line`` as a `Host` or `Match` line, whose block every later line belongs to."""
    keyword = re.split(r"[ \t=\r\n\f]", line.lstrip(" \t"), maxsplit=1)[0]
    return keyword.lower() in ("host", "match")


def updated_text(current: str, line: str) -> str:
    """``current`` with ``line`` above the first `Host` or `Match` line, once; every other line untouched, its line
    ending too.

    A ``line`` already there stays where it is: below another Include or option the user put first on purpose (to
    override an entry), or below the Include of another cluster's build, so that two builds' lines do not swap
    places on every run. Else it goes first, and a copy inside a block (where it only applies to that block) goes.
    Lines end at LF alone, as ssh reads them (str.splitlines would also split at a form feed, CR, U+2028...), and
    ``line`` ends as the file's first line does, so a CR LF config (edited on Windows) stays CR LF.
    """
    lines = [f"{text}\n" for text in current.split("\n")]
    lines[-1] = lines[-1].removesuffix("\n")  # what follows the last LF: "" or a last line without one
    ours = [index for index, old in enumerate(lines) if old.rstrip("\r\n") == line.rstrip("\n")]
    first_block = next((index for index, old in enumerate(lines) if _starts_a_block(old)), len(lines))
    if ours and ours[0] < first_block:
        return "".join(old for index, old in enumerate(lines) if index not in ours[1:])
    if lines[0].endswith("\r\n"):
        line = line.removesuffix("\n") + "\r\n"
    return line + "".join(old for index, old in enumerate(lines) if index not in ours)


def _owner(config: Path) -> int:
    """The uid owning ``config`` or, while it does not exist, the nearest directory above it that does (the home)."""
    for path in (config, *config.parents):
        try:
            return path.stat().st_uid
        except FileNotFoundError:
            continue
    return 0  # not even / exists: unreachable


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def ensure_include(config: Path, included: Path) -> bool:
    """Make ``config`` include ``included`` above its first block (see updated_text); True if the file was changed."""
    if not included.is_file():
        raise IncludeError(f"{included}: no such file; run `make` first to generate it")
    line = include_line(included.resolve())
    config = Path(os.path.realpath(config.expanduser()))
    try:
        # ssh reads bytes: a line that is not UTF-8 (a Latin-1 comment) is kept as it is, byte for byte, and so are
        # its line endings (read_text would turn every CR LF into LF).
        current = config.read_bytes().decode("utf-8", errors="surrogateescape")
        mode = config.stat().st_mode & 0o7777
    except FileNotFoundError:
        current, mode = "", NEW_FILE_MODE
    new = updated_text(current, line)
    if new == current:
        return False
    if not mode & stat.S_IWUSR:
        # A config made read-only (by hand, or by a dotfile manager that owns it and would write it over) is not
        # replaced behind its owner's back, as the rename would (only the directory's permissions count for it).
        raise IncludeError(f"{config} is read-only (mode {mode:04o}), so it was left as it is: make it writable"
                           f" and run again, or put this line at its top yourself: {line.rstrip()}")
    if os.geteuid() == 0 and (owner := _owner(config)) != 0:
        # `sudo -E make ~/.ssh/config`, or a sudo that keeps HOME: the file root writes is root's. A 0600 config (as
        # ssh advises) or a new ~/.ssh is then unreadable to the user's ssh, which skips it silently, all their
        # entries with it; a 0644 one is no longer theirs to edit.
        name = _user_name(owner)
        raise IncludeError(f"{config} is {name}'s, not root's, so it was left as it is: run this as {name}"
                           f" (a file root writes there would be root's, which {name}'s ssh may not read)")
    if not config.parent.is_dir():
        config.parent.mkdir(mode=SSH_DIR_MODE, parents=True)
        config.parent.chmod(SSH_DIR_MODE)  # mkdir's mode is reduced by the umask
    replace_text(config, new, flush=True, mode=mode, errors="surrogateescape")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generators.ssh_include", description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=locations.build_dir(),
                        help="the build directory holding ssh/config (default: $KVMCONF_BUILD or build)")
    parser.add_argument("--config", type=Path, default=Path("~/.ssh/config"),
                        help="the ssh config to include it from (default: ~/.ssh/config)")
    args = parser.parse_args(argv)
    included = (args.build / "ssh" / "config").absolute()
    try:
        changed = ensure_include(args.config, included)
    except (IncludeError, OSError) as err:
        print(f"kvmconf: {err}", file=sys.stderr)
        return 1
    state = "now includes" if changed else "already includes"
    print(f"{args.config.expanduser()} {state} {included.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
