"""Shared fixtures: the example cluster, golden-file comparison, real-tool requirements."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from generators.model import Cluster
from generators.validate import load_cluster
from tests.tools import ROOT, missing

# Generated banners name the inventory as given; run from the repo root so goldens are stable.
os.chdir(ROOT)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate", action="store_true",
                     help="rewrite tests/golden/ from the current generators instead of comparing")


@pytest.fixture(scope="session")
def example() -> Cluster:
    """The repository's own example cluster (cluster.conf + site.toml), validated."""
    return load_cluster(Path("cluster.conf"), Path("site.toml"))


@pytest.fixture(scope="session")
def regenerate(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate"))


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own, with nothing in it (not even loopback's address) until it adds some."""
    if os.geteuid() != 0:
        missing("network namespaces need root")
    name = f"kvmconf-heretest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=True)
