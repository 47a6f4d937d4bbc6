"""Real consumers of generated files: required under `make test`, skipped elsewhere if missing."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

import pytest

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
