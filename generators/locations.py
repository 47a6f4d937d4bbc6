"""Where the inputs and the build are when no flag names them: $KVMCONF_CLUSTER, $KVMCONF_SITE, $KVMCONF_BUILD.

Every entry point (`python -m generators`, `python -m generators.ssh_include`, the invoke and fab tasks) asks
here, so they all agree with the Makefile's `$(or $(KVMCONF_BUILD),build)`: an empty variable means the default,
as an unset one does. Taken as given, an empty KVMCONF_BUILD would be the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent  # the kvmconf checkout this code runs from


def the_checkout() -> Path:
    """The checkout, relative to the current directory ("." at its top): where the tasks' defaults are.

    invoke and fab find tasks.py and fabfile.py from a subdirectory (hosts/) too, and there `cluster.conf`
    would name a file that is not there; relative, the messages and banners stay as short as at the top.
    """
    return Path(os.path.relpath(CHECKOUT))


def _from_environment(name: str, default: Path) -> Path:
    return Path(os.environ.get(name) or default)


def cluster_path(base: Path = Path()) -> Path:
    """$KVMCONF_CLUSTER as given, else cluster.conf in ``base`` (default: the current directory)."""
    return _from_environment("KVMCONF_CLUSTER", base / "cluster.conf")


def site_path(base: Path = Path()) -> Path:
    return _from_environment("KVMCONF_SITE", base / "site.toml")


def build_dir(base: Path = Path()) -> Path:
    return _from_environment("KVMCONF_BUILD", base / "build")
