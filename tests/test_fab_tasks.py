"""`fab deploy` / `fab update-confs` as users run them, for what they check before reaching any VM."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def fab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}
    return subprocess.run([str(ROOT / ".venv/bin/fab"), *args], cwd=ROOT, env={**environment, **(env or {})},
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("task", ["deploy", "update-confs"])
@pytest.mark.parametrize("value", ["abc", "0", "-3", "1.5", ""])
def test_parallel_must_be_a_whole_number_of_at_least_one(task: str, value: str) -> None:
    result = fab(task, "--parallel", value)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kvmconf: --parallel '{value}': expected a whole number >= 1 (how many VMs at a time)\n")


def test_a_valid_parallel_is_taken(tmp_path: Path) -> None:
    # It gets past the check to the next one: the inventory (none here), not --parallel.
    result = fab("deploy", "--parallel", "12", env={"KVMCONF_CLUSTER": str(tmp_path / "none.conf")})
    assert result.returncode == 2
    assert result.stderr.startswith(f"kvmconf: {tmp_path / 'none.conf'}: no such file"), result.stderr
