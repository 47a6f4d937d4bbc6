"""The writer: whole-tree swap, untouched mtimes for unchanged files, stale files removed."""

from __future__ import annotations

import errno
import gc
import os
import warnings
from pathlib import Path, PurePosixPath

import pytest

from generators import writer
from generators.errors import UsageError
from generators.writer import STAMP, is_up_to_date, write_tree
from tests.tools import mount_tmpfs


def _tree(**files: str) -> dict[PurePosixPath, str | bytes]:
    return {PurePosixPath(name.replace("__", "/")): content for name, content in files.items()}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_first_write_creates_the_tree(tmp_path: Path) -> None:
    build = tmp_path / "build"
    report = write_tree(build, _tree(a__x="1\n", b="2\n", c=""), "d1")
    assert sorted(map(str, report.written)) == ["a/x", "b", "c"]
    assert (build / "a/x").read_text() == "1\n"
    assert (build / "c").read_text() == ""
    assert oct((build / "b").stat().st_mode & 0o777) == "0o644"
    assert is_up_to_date(build, "d1") == 3
    assert is_up_to_date(build, "other") is None


def test_unchanged_files_keep_their_mtime_and_inode(tmp_path: Path) -> None:
    build = tmp_path / "build"
    write_tree(build, _tree(a="1\n", b="2\n"), "d1")
    before = {name: (build / name).stat() for name in ("a", "b")}
    os.utime(build / "a", ns=(1_000_000_000, 1_000_000_000))  # make a later rewrite visible
    mtime_a = (build / "a").stat().st_mtime_ns
    report = write_tree(build, _tree(a="1\n", b="changed\n"), "d2")
    assert [str(p) for p in report.written] == ["b"]
    assert report.unchanged == 1
    assert (build / "a").stat().st_mtime_ns == mtime_a
    assert (build / "a").stat().st_ino == before["a"].st_ino
    assert (build / "b").read_text() == "changed\n"


def test_a_rebuild_with_no_change_writes_nothing(tmp_path: Path) -> None:
    build = tmp_path / "build"
    write_tree(build, _tree(a="1\n", d__e="2\n"), "d1")
    directory_inode = build.stat().st_ino
    mtimes = _mtimes(build)
    report = write_tree(build, _tree(a="1\n", d__e="2\n"), "d1")
    assert report.written == [] and report.removed == [] and report.unchanged == 2
    assert _mtimes(build) == mtimes
    assert build.stat().st_ino == directory_inode  # not even swapped


def test_files_no_longer_generated_disappear(tmp_path: Path) -> None:
    build = tmp_path / "build"
    write_tree(build, _tree(a="1\n", old__x="2\n"), "d1")
    report = write_tree(build, _tree(a="1\n"), "d2")
    assert [str(p) for p in report.removed] == ["old/x"]
    assert not (build / "old").exists()
    assert sorted(p.name for p in build.iterdir()) == sorted(["a", STAMP])


def test_binary_content_is_written_as_is(tmp_path: Path) -> None:
    build = tmp_path / "build"
    write_tree(build, {PurePosixPath("x.iso"): b"\x00\xff"}, "d1")
    assert (build / "x.iso").read_bytes() == b"\x00\xff"


def test_a_hand_edited_file_is_noticed_and_regenerated(tmp_path: Path) -> None:
    build = tmp_path / "build"
    write_tree(build, _tree(a="1\n"), "d1")
    (build / "a").write_text("edited by hand\n")
    assert is_up_to_date(build, "d1") is None
    report = write_tree(build, _tree(a="1\n"), "d1")
    assert [str(p) for p in report.written] == ["a"]
    assert (build / "a").read_text() == "1\n"


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    build = tmp_path / "build"
    leftover = tmp_path / ".kvmconf-staging-build-abc123"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub/file").write_text("half written")
    write_tree(build, _tree(a="1\n"), "d1")
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kvmconf-staging")] == []


@pytest.mark.parametrize("bad", ["/etc/passwd", "../escape", "a/../../b"])
def test_a_generator_cannot_write_outside_build(tmp_path: Path, bad: str) -> None:
    with pytest.raises(RuntimeError, match="programming error: generator produced a bad path"):
        write_tree(tmp_path / "build", {PurePosixPath(bad): "x"}, "d1")
    assert not (tmp_path / "build").exists()


def test_a_build_path_that_is_a_file_is_refused_and_kept(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("mine\n")
    with pytest.raises(UsageError, match=r"notes.txt: exists and is not a directory"):
        write_tree(precious, _tree(a="1\n"), "d1")
    assert precious.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_unwritable_build_location_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot create its parent directory"):
        write_tree(Path("/proc/kvmconf-test/build"), _tree(a="1\n"), "d1")


def _refusal(shown: str, build: Path) -> str:
    return (f"{shown}: not a build folder kvmconf wrote (it is not empty and has no .kvmconf-stamp); replacing it"
            f" would delete its files, so nothing was written. Give --build a new or empty folder"
            f" (e.g. {build}/build), or remove this one first if it only holds an old build")


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (links not followed): a file's content, a link's target, or <dir>."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = (f"-> {os.readlink(path)}" if path.is_symlink() else
                       "<dir>" if path.is_dir() else path.read_text())
    return found


@pytest.mark.parametrize("content", ["notes.txt", ".hidden", "sub/"])
def test_a_folder_kvmconf_did_not_write_is_refused_and_kept(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    if content.endswith("/"):
        (folder / content).mkdir()
    else:
        (folder / content).write_text("mine\n")
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError) as err:
        write_tree(folder, _tree(a="1\n"), "d1")
    assert str(err.value) == _refusal(str(folder), folder)
    assert _snapshot(tmp_path) == before  # not even a lock file or a staging tree beside it


def test_an_empty_folder_becomes_the_build(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    report = write_tree(tmp_path / "build", _tree(a="1\n"), "d1")
    assert [str(p) for p in report.written] == ["a"]
    assert (tmp_path / "build/a").read_text() == "1\n"


def test_a_link_to_the_build_folder_is_followed_and_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    link = tmp_path / "build"
    link.symlink_to("real")
    write_tree(link, _tree(a="1\n", b="2\n"), "d1")
    report = write_tree(link, _tree(a="1\n", c="3\n"), "d2")
    assert [str(p) for p in report.written] == ["c"] and [str(p) for p in report.removed] == ["b"]
    assert link.is_symlink() and os.readlink(link) == "real"
    assert _snapshot(tmp_path / "real") == {"a": "1\n", "c": "3\n", STAMP: (tmp_path / "real" / STAMP).read_text()}
    assert is_up_to_date(link, "d2") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".real.lock", "build", "real"]  # no staging leaked


def test_a_dangling_link_gets_its_target_created(tmp_path: Path) -> None:
    link = tmp_path / "build"
    link.symlink_to("out/build")
    write_tree(link, _tree(a="1\n"), "d1")
    assert link.is_symlink() and (tmp_path / "out/build/a").read_text() == "1\n"


def test_a_link_to_a_folder_kvmconf_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("mine\n")
    link = tmp_path / "build"
    link.symlink_to("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError) as err:
        write_tree(link, _tree(a="1\n"), "d1")
    assert str(err.value) == _refusal(f"{link} (a link to {tmp_path / 'mine'})", tmp_path / "mine")
    assert _snapshot(tmp_path) == before


def test_a_link_loop_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "build").symlink_to("loop")
    (tmp_path / "loop").symlink_to("build")
    with pytest.raises(UsageError, match=r"build: cannot follow its links: (Symlink loop from|\[Errno 40\])"):
        write_tree(tmp_path / "build", _tree(a="1\n"), "d1")


def test_a_leftover_link_is_removed_without_touching_its_target(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/file").write_text("mine\n")
    (tmp_path / ".kvmconf-staging-build-abc123").symlink_to("precious")
    write_tree(tmp_path / "build", _tree(a="1\n"), "d1")
    assert not (tmp_path / ".kvmconf-staging-build-abc123").is_symlink()
    assert _snapshot(tmp_path / "precious") == {"file": "mine\n"}


def test_a_refusal_leaves_no_directory_open(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("mine\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="not a build folder kvmconf wrote"):
            write_tree(tmp_path / "mine", _tree(a="1\n"), "d1")
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_a_full_disk_is_said_and_leaves_the_old_build_as_it_was(tmp_path: Path) -> None:
    """No space for the new tree (a real full filesystem): an error naming the build and why, not a traceback."""
    with mount_tmpfs(tmp_path / "small", "256k") as small:
        build = small / "build"
        write_tree(build, _tree(a="old\n"), "d1")
        before = _snapshot(build)
        with pytest.raises(UsageError) as caught:
            write_tree(build, _tree(a="new\n", big="x" * 1_000_000), "d2")
        assert str(caught.value) == f"{build}: cannot write the new build: No space left on device; nothing was changed"
        assert _snapshot(build) == before and is_up_to_date(build, "d1") == 1
        assert sorted(p.name for p in small.iterdir()) == [".build.lock", "build"]  # no staging tree left


def test_a_stamp_that_cannot_be_written_leaves_the_old_build_in_place(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp goes into the new tree before the swap: written after it, a failure left a build without a stamp,
    which every later run refused as 'not a build folder kvmconf wrote'."""
    build = tmp_path / "build"
    write_tree(build, _tree(a="old\n"), "d1")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(writer, "_write_stamp", full)
        with pytest.raises(UsageError, match="cannot write the new build: No space left on device"):
            write_tree(build, _tree(a="new\n"), "d2")
    assert (build / "a").read_text() == "old\n" and is_up_to_date(build, "d1") == 1
    write_tree(build, _tree(a="new\n"), "d2")  # the next run, with room again, is not refused
    assert (build / "a").read_text() == "new\n" and is_up_to_date(build, "d2") == 1


def test_without_rename_exchange_a_failed_swap_puts_the_old_build_back(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem has no RENAME_EXCHANGE the swap is two renames; the second failing left no build/ at
    all (the old one under a hidden .old name, never cleaned up) behind a traceback."""
    build = tmp_path / "build"
    write_tree(build, _tree(a="old\n"), "d1")
    before = _snapshot(build)
    rename = os.rename

    def failing_rename(source: str, target: str) -> None:
        if os.path.basename(source).startswith(".kvmconf-staging-") and not source.endswith(".old") and (
                target == str(build)):  # the new tree into place, not the old one back
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        rename(source, target)

    with monkeypatch.context() as patched:
        patched.setattr(writer.ctypes, "CDLL", lambda *args, **kwargs: object())  # a libc without renameat2
        patched.setattr(writer.os, "rename", failing_rename)
        with pytest.raises(UsageError, match="cannot write the new build: Input/output error; nothing was changed"):
            write_tree(build, _tree(a="new\n"), "d2")
    assert _snapshot(build) == before and is_up_to_date(build, "d1") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build.lock", "build"]
