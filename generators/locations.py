"""Where the inputs and the build are when no flag names them: $KVMCONF_CLUSTER, $KVMCONF_SITE, $KVMCONF_BUILD.

Every entry point (`python -m generators`, `python -m generators.ssh_include`, the invoke and fab tasks) asks
here, so they all agree with the Makefile's `$(or $(KVMCONF_BUILD),build)`: an empty variable means the default,
as an unset one does. Taken as given, an empty KVMCONF_BUILD would be the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def _from_environment(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def cluster_path() -> Path:
    return _from_environment("KVMCONF_CLUSTER", "cluster.conf")


def site_path() -> Path:
    return _from_environment("KVMCONF_SITE", "site.toml")


def build_dir() -> Path:
    return _from_environment("KVMCONF_BUILD", "build")
