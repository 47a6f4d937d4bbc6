"""kvmconf/files.py: a file is replaced whole, keeps its permissions, and a killed run's temporary file is reused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kvmconf import files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replace_keeps_the_permissions_the_admin_set(tmp_path: Path) -> None:
    conf = tmp_path / "cluster.conf"
    conf.write_text("old\n")
    conf.chmod(0o640)
    files.replace_text(conf, "new\n", mode=0o644)  # `mode` is for a new file only
    assert conf.read_text() == "new\n"
    assert mode(conf) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.conf"]


def test_a_new_file_gets_the_mode_asked_for_or_the_umask_default(tmp_path: Path) -> None:
    files.replace_text(tmp_path / "known_hosts", "k\n", mode=0o644)
    assert mode(tmp_path / "known_hosts") == 0o644
    umask = os.umask(0o027)
    try:
        files.replace_text(tmp_path / "state.json", "{}\n", flush=True)
    finally:
        os.umask(umask)
    assert mode(tmp_path / "state.json") == 0o640
    assert (tmp_path / "state.json").read_text() == "{}\n"


def test_a_killed_runs_temporary_file_is_reused_not_left(tmp_path: Path) -> None:
    target = tmp_path / "journal.json"
    leftover = tmp_path / ".journal.json.new"
    leftover.write_text("half of a jour")
    leftover.chmod(0o400)  # even one the next run could not open for writing
    files.replace_text(target, "whole\n", flush=True)
    assert target.read_text() == "whole\n"
    assert not leftover.exists()

