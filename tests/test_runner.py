"""Runner's time limit on a host's quick commands, and the pipeline a long copy runs in without one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmconf import runner
from kvmconf.errors import CommandFailed
from kvmconf.processes import alive
from kvmconf.runner import Runner, run_pipeline


def test_a_command_past_the_time_limit_is_stopped_and_fails_as_commandfailed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not subprocess.TimeoutExpired: every caller's clean-up (migrate's, provision's) catches KvmconfError."""
    monkeypatch.setattr(runner, "_TIMEOUT", 0.5)
    started = time.monotonic()
    with pytest.raises(CommandFailed) as failed:
        Runner().run(["sleep", "30"])  # run(), not only check(): a hung `test -e` is no "absent"
    assert str(failed.value) == ("`sleep 30` did not finish within 0.5 s and was stopped (a hung SSH session or"
                                 " host?)")
    assert time.monotonic() - started < 10


def test_a_pipeline_passes_data_through_reports_watched_lines_and_keeps_the_others(tmp_path: Path) -> None:
    seen: list[str] = []
    result = run_pipeline([["sh", "-c", "echo data; echo progress 1 >&2; echo oops >&2"],
                           ["sh", "-c", f"cat > {tmp_path / 'out'}; echo progress 2 >&2"]],
                          lambda line: _seen(seen, line))
    assert result.returncode == 0
    assert (tmp_path / "out").read_text() == "data\n"
    assert sorted(seen) == ["oops", "progress 1", "progress 2"]
    assert result.stderr == b"oops\n"


def _seen(seen: list[str], line: str) -> bool:
    seen.append(line)
    return line.startswith("progress")


@pytest.mark.parametrize(("first", "second", "status"), [("exit 3", "cat >/dev/null", 3),
                                                         ("true", "cat >/dev/null; exit 4", 4),
                                                         ("exit 3", "cat >/dev/null; exit 4", 4)])
def test_a_pipeline_fails_when_any_of_its_commands_fails(first: str, second: str, status: int) -> None:
    """With the last failure's status, as a shell's pipefail: a reader's failure is why its writer stopped."""
    result = run_pipeline([["sh", "-c", first], ["sh", "-c", second]], lambda _line: False)
    assert result.returncode == status


def test_a_missing_command_in_a_pipeline_is_reported_as_a_shell_would() -> None:
    result = run_pipeline([["true"], ["no-such-tool-kvmconf"]], lambda _line: False)
    assert (result.returncode, result.stderr) == (127, b"no-such-tool-kvmconf: command not found")


def test_a_pipeline_has_no_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy takes as long as its data needs: the quick commands' limit does not stop it.

    run_pipeline reads no limit today; this fails the day it honours _TIMEOUT (a watchdog that kills its commands
    after it, tried by hand: this test and test_migrate's scaled-down copy both fail then)."""
    monkeypatch.setattr(runner, "_TIMEOUT", 0.2)
    assert run_pipeline([["sleep", "1"], ["cat"]], lambda _line: False).returncode == 0


def test_an_interrupted_pipeline_stops_all_its_commands(tmp_path: Path) -> None:
    """No copy goes on writing behind a migration's clean-up."""
    pids = tmp_path / "pids"

    def interrupt(_line: str) -> bool:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline([["sh", "-c", f"echo $$ >> {pids}; exec sleep 30"],
                      ["sh", "-c", f"echo $$ >> {pids}; until [ $(wc -l < {pids}) -ge 2 ]; do sleep 0.01; done;"
                                   " echo started >&2; exec sleep 30"]], interrupt)
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2 and not any(alive(pid) for pid in started)
