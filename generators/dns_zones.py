"""Placeholder: being written."""

from __future__ import annotations

from pathlib import PurePosixPath

from generators.model import Cluster


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    return {}
