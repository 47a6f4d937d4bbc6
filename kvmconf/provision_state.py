"""What the provision server keeps in ``[provision] config_dir`` (default /etc/kvmconf): its build and install state.

  build/            the generated files as built (dnsmasq/, preseed/, cloud-init/, tftp/): the server's copy
  .build-previous/  during a deploy, build/ as it was (hard links), put back if the new dnsmasq does not start
  dnsmasq/          what dnsmasq reads (build/dnsmasq, checked before it replaces the running config)
  dnsmasq.pending   while a deploy changes dnsmasq/ and signals dnsmasq: left, the next deploy restarts it
  installed         the VMs whose network install is done, one name a line: the state a rebuild must keep
  http.log          one line per HTTP request (client, path, status)

A VM's install is marked done by its installer's late_command fetching ``<http_url>/installed/<vm>``
(kvmconf.install_http); the mark and the TFTP root made from it are kvmconf.tftp_tree's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from generators import pxe
from generators.files import exclusively, replace_text
from generators.writer import STAMP, write_tree

STATE_FILE = "installed"
STATE_LOCK = ".installed.lock"  # held while the installed state or the TFTP entries made from it change


def build_dir_in(config_dir: Path) -> Path:
    """config_dir/build: the server's copy of the generated files, which everything it serves comes from."""
    return config_dir / "build"


@contextlib.contextmanager
def build_kept_aside(config_dir: Path) -> Iterator[Callable[[], None]]:
    """build/ as it is now, kept aside for the block; calling what this yields makes build/ that again.

    Hard links are enough: the writer never changes a file of build/ in place, it swaps in a new tree. Putting
    back goes through the writer too, so that HTTP never sees build/ half old, half new, nor missing. The stamp
    it writes names no inputs (digest ""): the tree put back is never taken for any cluster's up-to-date build.
    """
    build = build_dir_in(config_dir).resolve()  # the writer follows a link: the tree is where it points
    aside = build.parent / ".build-previous"
    shutil.rmtree(aside, ignore_errors=True)  # a killed earlier deploy's
    if build.is_dir():
        shutil.copytree(build, aside, symlinks=True, copy_function=os.link)

    def put_back() -> None:
        files = ({} if not aside.is_dir() else  # there was no build: an empty one serves nothing, as before
                 {PurePosixPath(p.relative_to(aside).as_posix()): p.read_bytes()
                  for p in sorted(aside.rglob("*")) if p.is_file() and p != aside / STAMP})
        write_tree(build, files, "")

    try:
        yield put_back
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def read_installed(config_dir: Path) -> set[str]:
    try:
        text = (config_dir / STATE_FILE).read_text()
    except FileNotFoundError:
        return set()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def state_locked(config_dir: Path) -> contextlib.AbstractContextManager[None]:
    """An install mark and the assembly of the TFTP root take turns.

    A deploy reads the state, then copies the built tree leaving out installed VMs' entries. A mark
    landing in between (its installer finishing) would remove the VM's entry and then see the deploy
    copy it back: the installed VM would reinstall itself at its next network boot.
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    return exclusively(config_dir / STATE_LOCK)


def write_installed(config_dir: Path, names: Iterable[str]) -> None:
    body = "".join(f"{name}\n" for name in sorted(set(names)))
    replace_text(config_dir / STATE_FILE, "# VMs whose network install is done (kvmconf provision server)\n" + body)


def boot_entries(config_dir: Path, vm: str) -> list[str]:
    """The VM's per-MAC boot configs, relative to the TFTP root (its MAC from its hostsfile line in build/)."""
    try:
        text = (build_dir_in(config_dir) / "dnsmasq" / "dhcp-hosts" / vm).read_text()
    except FileNotFoundError:
        return []
    mac = next(line for line in text.splitlines() if line.strip() and not line.startswith("#")).split(",")[0]
    return pxe.boot_entries(mac)
