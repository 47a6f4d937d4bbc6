"""Run commands on a physical host: locally, or over SSH when its libvirt URI names a remote machine.

Disks are made with qemu-img and lvcreate where the VM will run, so the host that libvirt's URI
points at is also where these commands must go. Everything goes through :meth:`Runner.run`, so a
test can record or fake the exact argv (there is no device-mapper on CI machines for lvcreate),
with a time limit against a hung SSH session; but a disk copy, which takes as long as its data
needs and streams its progress, runs in :func:`run_pipeline`, with none.
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
from typing import IO
from urllib.parse import urlsplit

from generators.model import uri_host
from kvmconf.errors import CommandFailed
from kvmconf.processes import alive

# A command's output, as subprocess gives it: (returncode, stdout, stderr).
Result = subprocess.CompletedProcess[bytes]
Execute = Callable[[Sequence[str], bytes | None], Result]

TEMPORARY_SUFFIX = "kvmconf-new"  # the kind of temporary a file is made under, unless its maker names another
_TIMEOUT = 600  # qemu-img and lvcreate are quick; this only stops a hung SSH session forever (copies: run_pipeline)


def temporary_beside(path: str, suffix: str = TEMPORARY_SUFFIX) -> str:
    """A name beside ``path`` for making it, unique to this run: ``<dir>/.<name>.<machine>-<pid>.<random>.<suffix>``.

    The shape of generators.files.replace_text's temporaries (a dot file beside the target, unique per writer),
    but not its mkstemp: the file may be on another host (a Runner over SSH, an SFTP upload), where mkstemp cannot
    create it. So the name is made unique here, by this machine's name, this process's pid and 64 random bits, and
    the command that writes it (qemu-img, cat, tar, SFTP) creates it there; two runs on one path never share a
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
        return _not_found(argv)
    except subprocess.TimeoutExpired:
        # Killed by subprocess.run. A failure the admin can act on, never a traceback: every caller's clean-up
        # (a migration's, a provision run's) expects CommandFailed, and run()'s callers must not take a hung
        # command's missing output for an answer (`test -e` for "absent").
        raise CommandFailed(f"`{shlex.join(argv)}` did not finish within {_TIMEOUT:g} s and was stopped (a hung"
                            " SSH session or host?)") from None


def _not_found(argv: Sequence[str]) -> Result:
    # What a shell (and so ssh) reports for a missing command: the same message either way.
    return subprocess.CompletedProcess(list(argv), 127, b"", f"{argv[0]}: command not found".encode())


def run_pipeline(argvs: Sequence[Sequence[str]], watch: Callable[[str], bool]) -> Result:
    """Run ``argvs`` on this machine as a shell pipeline would (each one's output into the next), with no time limit.

    For a copy, which takes as long as the data needs: its progress is what shows it is alive. Every line the
    commands write on stderr goes to ``watch`` as it comes; those it returns True for (progress) are not part of
    the result's stderr. The exit status is the last non-zero one, as with a shell's pipefail: a failed reader is
    not hidden behind its writer's success, and the writer it stopped (SIGPIPE) does not hide why it failed.
    An interrupt kills them all: no copy goes on behind the caller's clean-up.
    """
    errors_read, errors_written = os.pipe()  # one stream for all of them, as a shell's pipeline has
    started: list[subprocess.Popen[bytes]] = []
    try:
        upstream: IO[bytes] | None = None
        for index, argv in enumerate(argvs):
            last = index == len(argvs) - 1
            try:
                started.append(subprocess.Popen(list(argv), stdin=upstream or subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                                                stderr=errors_written))
            except FileNotFoundError:
                return _not_found(argv)  # the finally below stops the ones started before
            finally:
                if upstream is not None:
                    upstream.close()  # the reader has it now: when the reader ends, its writer gets EPIPE
            upstream = started[-1].stdout
        os.close(errors_written)
        errors_written = -1
        kept = []
        with open(errors_read, "rb", closefd=False) as errors:
            for line in errors:  # until every one of them has ended (or closed its stderr)
                if not watch(line.decode(errors="replace").rstrip("\n")):
                    kept.append(line)
        codes = [process.wait() for process in started]
        return subprocess.CompletedProcess([" | ".join(map(shlex.join, argvs))],
                                           next((c for c in reversed(codes) if c), 0), b"", b"".join(kept))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        os.close(errors_read)
        if errors_written != -1:
            os.close(errors_written)


@dataclass
class Runner:
    """Where a host's commands run: ``ssh`` is None for this machine, else ``[user@]host`` (and port)."""

    ssh: str | None = None
    port: int | None = None
    execute: Execute = _execute

    @property
    def where(self) -> str:
        return self.ssh or "localhost"

    def argv(self, argv: Sequence[str], ssh_options: Sequence[str] = ()) -> list[str]:
        """The argv actually executed: the command itself, or ssh (given ``ssh_options`` too) running it on the host."""
        if self.ssh is None:
            return list(argv)
        # BatchMode: a provision run must fail, not hang, when the key is not accepted.
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", "-o", "BatchMode=yes", *ssh_options, *port, self.ssh, "--", shlex.join(argv)]

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


def describe_failure(where: str, argv: Sequence[str] | str, result: Result) -> str:
    """``argv`` is one command's, or a whole command line as a shell would run it (a pipeline)."""
    stderr = result.stderr.decode(errors="replace").strip()
    tail = "\n".join(stderr.splitlines()[-5:]) or "(no error output)"
    command = argv if isinstance(argv, str) else shlex.join(argv)
    return f"{where}: `{command}` failed with exit status {result.returncode}: {tail}"


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
