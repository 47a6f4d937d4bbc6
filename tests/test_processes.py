"""kvmconf.processes: PID helpers that modules use without importing the lab (libvirt, jinja)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmconf.errors import KvmconfError
from kvmconf.processes import alive, output_of, stop_pid


def test_runner_does_not_import_the_lab_libvirt_or_jinja() -> None:
    # A fresh interpreter: this test process has long imported them for other tests.
    code = ("import sys, kvmconf.runner;"
            " print(sorted(m for m in ('kvmconf.lab', 'libvirt', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"


def test_a_stopped_child_is_not_alive_even_before_it_is_reaped() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert alive(child.pid)
        stop_pid(child.pid, timeout=5)  # returns once it is a zombie: /proc still has it until wait()
        assert not alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_failed_tool_is_named_as_a_shell_would_run_it() -> None:
    """Quoted as runner.describe_failure quotes a command: an argument with spaces reads as one, and pastes as one."""
    with pytest.raises(KvmconfError) as failed:
        output_of(["sh", "-c", "echo it failed >&2; exit 3"], context="lab: ")
    assert str(failed.value) == "lab: `sh -c 'echo it failed >&2; exit 3'` failed with exit status 3: it failed"
