"""Real consumers of generated files: required under `make test`, skipped elsewhere if missing."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the checkout

# `make test` sets this: there, a missing tool is a failure, never a skip.
REQUIRE_TOOLS = os.environ.get("KVMCONF_REQUIRE_TOOLS") == "1"


def missing(message: str) -> NoReturn:
    """Something a test needs is not here: a failure under `make test`, a skip elsewhere."""
    if REQUIRE_TOOLS:
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The tool's path; fails under `make test` and skips otherwise when it is not installed."""
    # sbin is not on every PATH (a plain `su`), but dnsmasq and nagios4 live there.
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        missing(f"{name} is not installed (make test-deps installs it)")
    return path


def require_module(name: str) -> ModuleType:
    """A Python module of requirements-test.txt (libvirt-python): like require_tool, never a silent skip in CI."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"Python module {name} cannot be imported ({err}; make test-deps installs it)")


def run(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing text output; the caller asserts on returncode, stdout and stderr."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]


@contextmanager
def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A filesystem of its own at ``path`` (made if missing) for the block, as a disk or NFS share would be:
    its own free space, its own device. Mounting needs root: missing() otherwise."""
    options = f"{'ro,' if read_only else ''}size={size}"
    with _mounted(path, ["-t", "tmpfs", "-o", options, "kvmconf-test"]):
        yield path


@contextmanager
def mount_ext4(path: Path, size: str) -> Iterator[Path]:
    """A small ext4 at ``path``, on a loop device over a file beside it: a disk's filesystem, with direct I/O and
    a block allocator, which a tmpfs does not have. Needs root: missing() otherwise."""
    image = path.with_name(path.name + ".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    with _mounted(path, ["-o", "loop", str(image)]):  # the loop device goes with the mount (autoclear)
        yield path


@contextmanager
def mount_ramfs(path: Path) -> Iterator[Path]:
    """A ramfs at ``path``: a filesystem that refuses direct I/O (EINVAL), as some FUSE ones do. Needs root."""
    with _mounted(path, ["-t", "ramfs", "kvmconf-test"]):
        yield path


@contextmanager
def _mounted(path: Path, mount_args: list[str]) -> Iterator[None]:
    if os.geteuid() != 0:
        missing("mounting a filesystem needs root")
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", *mount_args, str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


# The first line of a `python -c` child's code, for output_unless_hung: SIGUSR1 prints every thread's stack.
PRINT_STACKS_ON_SIGUSR1 = "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def output_unless_hung(child: subprocess.Popen[str], timeout: float) -> str:
    """What `child` printed once it exited. If it has not within `timeout` seconds, the test fails with where each
    of its threads was: the child must have run PRINT_STACKS_ON_SIGUSR1 (or registered faulthandler alike)."""
    try:
        return child.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGUSR1)
        time.sleep(2)
        child.kill()
        raise AssertionError(f"{child.args!r} did not exit within {timeout:g} s:\n{child.communicate()[0]}") from None
