"""disks.create and make_new with the real qemu-img and ln: what is left on the host when something goes wrong."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from generators.model import DiskKind
from kvmconf import disks
from kvmconf.errors import DiskExists
from kvmconf.runner import Result, Runner


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
        assert (tmp_path / "db.img.kvmconf-new").exists()  # the temporary is there when the interrupt comes
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
