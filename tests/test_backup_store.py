"""A VM's backup directory as an admin or a failure leaves it: a point deleted by hand from the middle of a chain,
a damaged manifest moved aside as the error says, a removal that fails midway, a retention of nothing.

Real files on the test's filesystem; the failing removal is a real one (an immutable file: `chattr +i`, as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvmconf.backup.store import MANIFEST, ChainBroken, VmStore, expired_chains
from kvmconf.errors import KvmconfError
from tests.test_backup_durability import add_chain, add_point, times
from tests.tools import missing

FULL, INC1, INC2 = "20260101T000000Z", "20260102T000000Z", "20260103T000000Z"


def test_a_point_missing_from_the_middle_of_a_chain_is_named_with_the_points_that_need_it(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "web")
    add_chain(store)
    add_point(store, "20260104T000000Z", "20260104T000000Z", None, b"full2")
    shutil.rmtree(store.point_dir(INC1))  # deleted by hand
    expected = (f"web: restore point {INC1} is missing from {store.dir} (deleted or moved away): the points built on"
                f" it cannot be restored ({INC2}); restore an earlier point or one of a later chain")
    with pytest.raises(ChainBroken) as err:
        store.chain_of(store.points()[1])
    assert str(err.value) == expected and isinstance(err.value, KvmconfError)  # a message, not a traceback
    assert store.chain_intact(store.points()[1]) == expected
    assert store.chain_intact(store.points()[0]) is None  # the full before it is whole
    assert store.chain_intact(store.points()[2]) is None  # and so is the next chain


def test_a_chain_whose_disk_file_is_gone_is_not_intact(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "web")
    add_chain(store)
    (store.point_dir(FULL) / "vda.qcow2").unlink()
    assert store.chain_intact(store.points()[-1]) == f"web: {store.point_dir(FULL)}/vda.qcow2 is missing"


def test_a_manifest_that_does_not_parse_moved_where_the_error_says_unblocks_the_vm(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "web")
    add_chain(store)
    (store.point_dir(INC2) / MANIFEST).write_text("{")
    with pytest.raises(KvmconfError) as err:
        store.points()
    damaged = store.point_dir(INC2)
    assert str(err.value) == (f"{damaged}/{MANIFEST}: the restore point's manifest does not parse (JSONDecodeError:"
                              " Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): rename"
                              f" {damaged} to {damaged}.damaged (any name that is not a point's time) to go on; the"
                              " points built on it then cannot be restored")
    damaged.rename(f"{damaged}.damaged")  # as the message says
    assert times(store) == [FULL, INC1]
    (store.dir / "old-aside").mkdir()  # any other name is out of the way too
    shutil.copy(f"{damaged}.damaged/{MANIFEST}", store.dir / "old-aside" / MANIFEST)
    assert times(store) == [FULL, INC1] and not store.is_point("old-aside")


def test_a_removal_that_fails_midway_fails_loudly_and_leaves_a_partial_for_recovery(tmp_path: Path) -> None:
    """A real failure: an immutable file (chattr +i) that even root cannot delete, as a read-only or failing disk."""
    if os.geteuid() != 0:
        missing("chattr +i needs root")
    store = VmStore(tmp_path, "web")
    add_chain(store)
    stuck = store.point_dir(INC2) / "vda.qcow2"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    partial = store.dir / f"{INC2}.partial"
    try:
        with pytest.raises(PermissionError):
            store.remove_point(INC2)
        assert times(store) == [FULL, INC1]  # no half point that looks whole
        assert store.partials() == [partial]  # what the next run's recovery (or NAS stage) removes
    finally:
        subprocess.run(["chattr", "-i", str(partial / "vda.qcow2")], check=False)
        subprocess.run(["chattr", "-i", str(stuck)], check=False)
    add_point(store, INC2, FULL, INC1, b"inc2 again")  # the same time again: the leftover partial is in the way
    (partial / "marker").write_text("left by the failed removal")
    store.remove_point(INC2)
    assert times(store) == [FULL, INC1] and store.partials() == []


def test_retention_of_fewer_than_one_point_is_refused(tmp_path: Path) -> None:
    store = VmStore(tmp_path, "web")
    add_chain(store)
    with pytest.raises(ValueError) as err:
        expired_chains(store.points(), 0)
    assert str(err.value) == "keep must be at least 1 (the newest point is always kept), not 0"
    with pytest.raises(ValueError):
        store.prune(-1, print)
    assert times(store) == [FULL, INC1, INC2]


def test_a_point_removed_while_the_points_are_listed_is_no_point_not_an_error(tmp_path: Path) -> None:
    """backup-status (every few minutes, from Nagios) and backup-verify take no lock: a retention's first step,
    the rename of a point to <time>.partial, between the listing and the read of its manifest raised
    FileNotFoundError (Nagios: UNKNOWN; backup-verify: a traceback, the next VMs not verified). Real renames,
    as remove_point makes them, in a loop to meet that moment."""
    store = VmStore(tmp_path, "web")
    add_chain(store)
    point, aside = store.point_dir(INC2), store.dir / f"{INC2}.partial"
    stop = threading.Event()

    def remove_and_put_back() -> None:
        while not stop.is_set():
            point.rename(aside)
            aside.rename(point)

    flipper = threading.Thread(target=remove_and_put_back)
    flipper.start()
    seen = set()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            seen.add(tuple(times(store)))
    finally:
        stop.set()
        flipper.join()
    assert seen <= {(FULL, INC1), (FULL, INC1, INC2)}, seen
