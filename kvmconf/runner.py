"""Run commands on a physical host: locally, or over SSH when its libvirt URI names a remote machine.

Disks are made with qemu-img and lvcreate where the VM will run, so the host that libvirt's URI
points at is also where these commands must go. Everything goes through :meth:`Runner.run`, so a
test can record or fake the exact argv (there is no device-mapper on CI machines for lvcreate).
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from generators.model import uri_host
from kvmconf.errors import CommandFailed
from kvmconf.processes import alive

# A command's output, as subprocess gives it: (returncode, stdout, stderr).
Result = subprocess.CompletedProcess[bytes]
Execute = Callable[[Sequence[str], bytes | None], Result]

TEMPORARY_SUFFIX = "kvmconf-new"  # the kind of temporary a file is made under, unless its maker names another
_TIMEOUT = 600  # qemu-img and lvcreate are quick; this only stops a hung SSH session forever


def temporary_beside(path: str, suffix: str = TEMPORARY_SUFFIX) -> str:
    """A name beside ``path`` for making it, unique to this run: ``<dir>/.<name>.<machine>-<pid>.<random>.<suffix>``.

    The shape of generators.files.replace_text's temporaries (a dot file beside the target, unique per writer),
    but not its mkstemp: the file may be on another host (a Runner over SSH, an SFTP upload), where mkstemp cannot
    create it. So the name is made unique here, by this machine's name, this process's pid and 64 random bits, and
    the command that writes it (qemu-img, cat, cp, scp, SFTP) creates it there; two runs on one path never share a
    temporary. A dot file, so conf directories (dnsmasq's, nagios's) skip it while it is there. The machine and
    pid say whose it is: :func:`abandoned_temporaries` finds those a killed run of this machine left.
    """
    name = f".{posixpath.basename(path)}.{_origin()}.{secrets.token_hex(8)}.{suffix}"
    return posixpath.join(posixpath.dirname(path), name)


def _origin() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def abandoned_temporaries(runner: Runner, path: str, suffix: str) -> list[str]:
    """Temporaries of ``path`` (:func:`temporary_beside`) whose run was killed (SIGKILL, power cut) on this machine.

    Such a run could not remove its temporary, which for a disk copy can be gigabytes. Only this machine's are
    judged, by whether their pid still runs here: a temporary of a run on another machine (an admin's workstation
    beside this one) is never taken for abandoned.
    """
    directory, base = posixpath.split(path)
    pattern = "." + re.sub(r"([][*?\\])", r"\\\1", base) + ".*." + suffix  # find -name's glob, base taken literally
    found = runner.run(["find", directory or ".", "-maxdepth", "1", "-name", pattern, "-print0"])
    return abandoned_among(found.stdout.decode(errors="replace").split("\0"), path, suffix)


def abandoned_among(candidates: Iterable[str], path: str, suffix: str = TEMPORARY_SUFFIX) -> list[str]:
    """Those of ``candidates`` (paths, as a listing of ``path``'s directory gives them) that are temporaries of
    ``path`` left by a killed run of this machine (:func:`abandoned_temporaries`).

    Apart from the listing, so that a caller which lists a remote directory its own way (deploy's SFTP uploads,
    listed in the round trip that reads the checksums) judges the names by this same rule.
    """
    directory, base = posixpath.split(path)
    prefix, end = f".{base}.", f".{suffix}"
    here = socket.gethostname()
    abandoned = []
    for candidate in candidates:
        parent, name = posixpath.split(candidate)
        if parent != (directory or ".") or not name.startswith(prefix) or not name.endswith(end):
            continue  # another directory's, another file's or another kind's (find only lists the right ones)
        middle = name[len(prefix):-len(end)]  # <machine>-<pid>.<random>
        origin, _, random = middle.rpartition(".")
        machine, _, pid = origin.rpartition("-")
        if (machine == here and pid.isdigit() and re.fullmatch(r"[0-9a-f]{16}", random)
                and int(pid) != os.getpid() and not alive(int(pid))):
            abandoned.append(candidate)
    return abandoned


def fresh_temporary(runner: Runner, path: str, suffix: str = TEMPORARY_SUFFIX) -> str:
    """This run's temporary for ``path`` (:func:`temporary_beside`), once what killed runs of this machine left
    beside it (:func:`abandoned_temporaries`) is removed."""
    for leftover in abandoned_temporaries(runner, path, suffix):
        runner.remove(leftover)
    return temporary_beside(path, suffix)


def _execute(argv: Sequence[str], stdin: bytes | None) -> Result:
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, timeout=_TIMEOUT, check=False)
    except FileNotFoundError:
        # What a shell (and so ssh) reports for a missing command: the same message either way.
        return subprocess.CompletedProcess(list(argv), 127, b"", f"{argv[0]}: command not found".encode())


@dataclass
class Runner:
    """Where a host's commands run: ``ssh`` is None for this machine, else ``[user@]host`` (and port)."""

    ssh: str | None = None
    port: int | None = None
    execute: Execute = _execute

    @property
    def where(self) -> str:
        return self.ssh or "localhost"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The argv actually executed: the command itself, or ssh running it on the host."""
        if self.ssh is None:
            return list(argv)
        # BatchMode: a provision run must fail, not hang, when the key is not accepted.
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", "-o", "BatchMode=yes", *port, self.ssh, "--", shlex.join(argv)]

    def run(self, argv: Sequence[str], stdin: bytes | None = None) -> Result:
        """Run and return the result whatever the exit status (see :meth:`check`)."""
        return self.execute(self.argv(argv), stdin)

    def check(self, argv: Sequence[str], stdin: bytes | None = None) -> Result:
        """Run; raise :class:`CommandFailed` with the command and its stderr on a non-zero exit."""
        result = self.run(argv, stdin)
        if result.returncode != 0:
            raise CommandFailed(describe_failure(self.where, argv, result))
        return result

    def exists(self, path: str) -> bool:
        # -e follows symlinks: a dangling link (e.g. to a removed LV) counts as absent, like for qemu.
        return self.run(["test", "-e", path]).returncode == 0

    def existing(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` exist, in one command: one SSH round trip per host, not one per VM."""
        if not paths:
            return set()
        script = 'for p in "$@"; do [ -e "$p" ] && printf "%s\\0" "$p"; done; exit 0'
        result = self.check(["sh", "-c", script, "sh", *paths])
        return {p for p in result.stdout.decode().split("\0") if p}

    def write(self, path: str, data: bytes) -> None:
        """Write a file in one piece: to a temporary name first, then renamed over ``path``.

        The temporary is removed when the write fails or is interrupted (by the script itself, or here); what a
        killed run of this machine left beside ``path`` is removed first.
        """
        tmp = fresh_temporary(self, path)
        try:
            self.check(["sh", "-c", 'cat > "$1" && mv -f -- "$1" "$2" || { rm -f -- "$1"; exit 1; }', "sh", tmp, path],
                       stdin=data)
        except BaseException:
            self.run(["rm", "-f", "--", tmp])  # gone already unless interrupted between cat and mv
            raise

    def read(self, path: str) -> bytes | None:
        """The file's content, or None when it does not exist."""
        result = self.run(["cat", "--", path])
        return result.stdout if result.returncode == 0 else None

    def remove(self, path: str) -> None:
        self.check(["rm", "-f", "--", path])


def describe_failure(where: str, argv: Sequence[str], result: Result) -> str:
    stderr = result.stderr.decode(errors="replace").strip()
    tail = "\n".join(stderr.splitlines()[-5:]) or "(no error output)"
    return f"{where}: `{shlex.join(argv)}` failed with exit status {result.returncode}: {tail}"


def runner_for_uri(uri: str, execute: Execute = _execute) -> Runner:
    """Local for ``qemu:///system``, ``qemu+unix://...`` and ``test://``; SSH to the URI's host otherwise."""
    host = uri_host(uri)  # the one rule of which URIs name another machine (None: local, loopback too)
    if host is None:
        return Runner(None, None, execute)
    parts = urlsplit(uri)
    user = f"{parts.username}@" if parts.username else ""
    # Only qemu+ssh's port is an SSH port; tcp/tls ports belong to libvirtd, SSH stays on 22.
    port = parts.port if parts.scheme.endswith("+ssh") else None
    return Runner(f"{user}{host}", port, execute)
