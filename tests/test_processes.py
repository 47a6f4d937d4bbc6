"""kvmconf.processes: PID helpers that modules use without importing the lab (libvirt, jinja)."""

from __future__ import annotations

import subprocess
import sys

from kvmconf.processes import alive, stop_pid


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
