"""Real consumers of generated files: required under `make test`, skipped elsewhere if missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest

# `make test` sets this: there, a missing tool is a failure, never a skip.
REQUIRE_TOOLS = os.environ.get("KVMCONF_REQUIRE_TOOLS") == "1"


def require_tool(name: str) -> str:
    """The tool's path; fails under `make test` and skips otherwise when it is not installed."""
    # sbin is not on every PATH (a plain `su`), but dnsmasq and nagios4 live there.
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed (make test-deps installs it)"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing text output; the caller asserts on returncode, stdout and stderr."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]
