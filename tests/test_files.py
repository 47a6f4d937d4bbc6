"""generators/files.py: a file is replaced whole, keeps its permissions, and a failed write leaves nothing behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from generators import files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replace_keeps_the_permissions_the_admin_set(tmp_path: Path) -> None:
    conf = tmp_path / "cluster.conf"
    conf.write_text("old\n")
    conf.chmod(0o640)
    files.replace_text(conf, "new\n", mode=0o600)  # `mode` is for a new file only
    assert conf.read_text() == "new\n"
    assert mode(conf) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.conf"]


def test_a_new_file_gets_the_mode_asked_for_whatever_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0o077)
    try:
        files.replace_text(tmp_path / "known_hosts", "k\n")
        files.replace_text(tmp_path / "journal.json", "{}\n", flush=True, mode=0o600)
    finally:
        os.umask(umask)
    assert mode(tmp_path / "known_hosts") == 0o644  # dnsmasq reads its files as its own user
    assert (mode(tmp_path / "journal.json"), (tmp_path / "journal.json").read_text()) == (0o600, "{}\n")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "journal.json"
    target.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        files.replace_text(target, "half \udc80 written", flush=True)  # a lone surrogate cannot be encoded
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.json"]
