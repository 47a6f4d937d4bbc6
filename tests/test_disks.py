"""disks.create and make_new with the real qemu-img and ln: what is left on the host when something goes wrong."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from generators.model import DiskKind
from kvmconf import disks
from kvmconf.errors import CommandFailed, DiskExists
from kvmconf.runner import Result, Runner, temporary_beside


def _real(argv: Sequence[str], stdin: bytes | None) -> Result:
    return subprocess.run(list(argv), input=stdin, capture_output=True, check=False)


def _then(program: str, act: Callable[[], object]) -> Callable[[Sequence[str], bytes | None], Result]:
    """Runs commands for real; ``act()`` right after ``program`` has run (an interrupt, another program's file)."""
    def execute(argv: Sequence[str], stdin: bytes | None) -> Result:
        result = _real(argv, stdin)
        if argv[0] == program:
            act()
        return result
    return execute


def _raw(tmp_path: Path) -> disks.DiskSpec:
    return disks.DiskSpec("db", str(tmp_path / "db.img"), DiskKind.RAW, 1)


def test_an_interrupt_as_qemu_img_finishes_leaves_no_temporary(tmp_path: Path) -> None:
    def interrupt() -> None:
        assert [p.name for p in tmp_path.glob(".db.img.*.kvmconf-new")] != []  # the temporary is there by now
        raise KeyboardInterrupt

    placed: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        disks.create(Runner(execute=_then("qemu-img", interrupt)), _raw(tmp_path), placed.append)
    assert list(tmp_path.iterdir()) == []
    assert placed == []


def test_a_disk_that_appears_before_the_link_is_kept_and_not_reported_as_made(tmp_path: Path) -> None:
    disk = _raw(tmp_path)
    placed: list[str] = []
    with pytest.raises(DiskExists) as refused:
        disks.create(Runner(execute=_then("qemu-img", lambda: Path(disk.path).write_bytes(b"theirs"))), disk,
                     placed.append)
    assert str(refused.value) == disks.already_there(disk)
    assert str(refused.value).startswith(f"db: its disk {disk.path} already exists and is never overwritten")
    assert [p.name for p in tmp_path.iterdir()] == ["db.img"]
    assert Path(disk.path).read_bytes() == b"theirs"
    assert placed == []


def test_a_created_disk_is_reported_as_made_once_it_is_in_place(tmp_path: Path) -> None:
    disk = _raw(tmp_path)
    seen: list[bool] = []
    disks.create(Runner(execute=_real), disk, lambda path: seen.append(Path(path).stat().st_size == disks.GIB))
    assert seen == [True]
    assert [p.name for p in tmp_path.iterdir()] == ["db.img"]


@pytest.mark.parametrize("program", ["ln", "rm"])  # while ln runs (it may have linked), once it has
def test_an_interrupt_as_the_file_lands_still_reports_it_as_made(tmp_path: Path, program: str) -> None:
    """The caller's clean-up must know the file is its own: reported before the temporary is removed."""
    def interrupt() -> None:
        raise KeyboardInterrupt

    placed: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        disks.make_new(Runner(execute=_then(program, interrupt)), str(tmp_path / "seed.iso"), "kvmconf-migrating",
                       lambda tmp: Path(tmp).write_bytes(b"seed"), placed.append)
    assert placed == [str(tmp_path / "seed.iso")]
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_a_temporary_is_a_dot_file_beside_its_target_unique_to_the_run() -> None:
    name = temporary_beside("/var/lib/libvirt/images/db.qcow2")
    origin = re.escape(f"{socket.gethostname()}-{os.getpid()}")
    assert re.fullmatch(rf"/var/lib/libvirt/images/\.db\.qcow2\.{origin}\.[0-9a-f]{{16}}\.kvmconf-new", name), name
    assert temporary_beside("/etc/x.conf", "kvmconf-migrating").endswith(".kvmconf-migrating")
    assert len({temporary_beside("/var/lib/libvirt/images/db.qcow2") for _ in range(100)}) == 100


def test_two_runs_making_one_file_never_share_a_temporary(tmp_path: Path) -> None:
    """A second run starts while the first is writing: each writes its own temporary, and only one file is made."""
    target = str(tmp_path / "seed.iso")
    temporaries: list[str] = []

    def second(tmp: str) -> None:
        temporaries.append(tmp)
        Path(tmp).write_bytes(b"second")

    def first(tmp: str) -> None:
        temporaries.append(tmp)
        Path(tmp).write_bytes(b"first, half written")
        assert disks.make_new(Runner(execute=_real), target, "kvmconf-new", second)  # it finishes first
        assert Path(tmp).read_bytes() == b"first, half written"  # the second run neither wrote nor removed it

    assert not disks.make_new(Runner(execute=_real), target, "kvmconf-new", first)  # the file is there: not made
    assert len(set(temporaries)) == 2 and all(Path(t).parent == tmp_path for t in temporaries)
    assert Path(target).read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]  # neither temporary is left


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_failed_or_interrupted_write_leaves_no_temporary(tmp_path: Path, interrupted: bool) -> None:
    # An `mv` first on PATH that fails (a full disk), or that does nothing and is then interrupted (Ctrl-C between
    # cat and mv): the temporary was written either way.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mv").write_text("#!/bin/sh\n" + ("exit 0\n" if interrupted else "echo 'mv: no space left' >&2; exit 1\n"))
    (fake / "mv").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}

    def execute(argv: Sequence[str], stdin: bytes | None) -> Result:
        result = subprocess.run(list(argv), input=stdin, capture_output=True, check=False, env=env)
        if interrupted and argv[0] == "sh":
            raise KeyboardInterrupt
        return result

    (tmp_path / "files").mkdir()
    seed = tmp_path / "files/seed.iso"
    with pytest.raises(KeyboardInterrupt if interrupted else CommandFailed) as failed:
        Runner(execute=execute).write(str(seed), b"new")
    if not interrupted:
        assert str(failed.value).startswith("localhost: `sh -c ") and str(failed.value).endswith(
            "failed with exit status 1: mv: no space left")
    assert list((tmp_path / "files").iterdir()) == []


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_runs_temporary_is_removed_by_the_next_run_and_no_other(tmp_path: Path) -> None:
    """A SIGKILLed copy cannot remove its temporary (a disk's can be gigabytes): the next run of this machine does.

    Kept: a temporary whose run still goes on here, one of another machine (its pid means nothing here), one of
    another file, and one of another kind (suffix)."""
    here = socket.gethostname()
    with subprocess.Popen(["sleep", "60"]) as running:
        try:
            names = {
                "killed": f".seed.iso.{here}-{_dead_pid()}.0123456789abcdef.kvmconf-migrating",
                "running": f".seed.iso.{here}-{running.pid}.0123456789abcdef.kvmconf-migrating",
                "elsewhere": f".seed.iso.workstation2-{_dead_pid()}.0123456789abcdef.kvmconf-migrating",
                "other file": f".seed.iso2.{here}-{_dead_pid()}.0123456789abcdef.kvmconf-migrating",
                "other kind": f".seed.iso.{here}-{_dead_pid()}.0123456789abcdef.kvmconf-new",
            }
            for name in names.values():
                (tmp_path / name).write_bytes(b"half a copy")
            assert disks.make_new(Runner(execute=_real), str(tmp_path / "seed.iso"), "kvmconf-migrating",
                                  lambda tmp: Path(tmp).write_bytes(b"seed"))
        finally:
            running.kill()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"seed.iso"} | {name for what, name in names.items() if what != "killed"}


def test_a_name_with_glob_characters_finds_only_its_own_temporaries(tmp_path: Path) -> None:
    from kvmconf.runner import abandoned_temporaries

    here, dead = socket.gethostname(), _dead_pid()
    own = tmp_path / f".d[1]*.img.{here}-{dead}.0123456789abcdef.kvmconf-new"
    other = tmp_path / f".d1x.img.{here}-{dead}.0123456789abcdef.kvmconf-new"  # what d[1]*.img matches as a glob
    own.write_bytes(b"")
    other.write_bytes(b"")
    assert abandoned_temporaries(Runner(execute=_real), str(tmp_path / "d[1]*.img"), "kvmconf-new") == [str(own)]


def test_runner_write_removes_a_killed_writes_temporary_of_the_same_file(tmp_path: Path) -> None:
    here = socket.gethostname()
    killed = tmp_path / f".seed.iso.{here}-{_dead_pid()}.0123456789abcdef.kvmconf-new"
    other_file = tmp_path / f".user-data.{here}-{_dead_pid()}.0123456789abcdef.kvmconf-new"
    killed.write_bytes(b"half a seed")
    other_file.write_bytes(b"half a file")
    Runner(execute=_real).write(str(tmp_path / "seed.iso"), b"seed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_file.name, "seed.iso"]
    assert (tmp_path / "seed.iso").read_bytes() == b"seed"
