"""What the provision server keeps in ``[provision] config_dir`` (default /etc/kvmconf): its build and install state.

  build/            the generated files as built (dnsmasq/, preseed/, cloud-init/, tftp/): the server's copy
  dnsmasq/          what dnsmasq reads (build/dnsmasq, checked before it replaces the running config)
  installed         the VMs whose network install is done, one name a line: the state a rebuild must keep
  http.log          one line per HTTP request (client, path, status)

A VM's install is marked done by its installer's late_command fetching ``<http_url>/installed/<vm>``
(kvmconf.install_http); the mark and the TFTP root made from it are kvmconf.tftp_tree's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from generators import pxe
from generators.files import exclusively, replace_text

STATE_FILE = "installed"
STATE_LOCK = ".installed.lock"  # held while the installed state or the TFTP entries made from it change


def build_dir_in(config_dir: Path) -> Path:
    """config_dir/build: the server's copy of the generated files, which everything it serves comes from."""
    return config_dir / "build"


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
