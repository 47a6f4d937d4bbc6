"""libvirt connections, one per physical host's URI from site.toml, opened once per run.

Nothing here hard-codes ``qemu:///system``: the URI comes from ``[hosts.<name>] uri`` (or the
lab's socket), and the opener is injectable so tests use ``test:///default``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Protocol

import libvirt

from generators.model import Cluster
from kvmconf.errors import HostUnreachable
from kvmconf.runner import Execute, Runner, runner_for_uri

Opener = Callable[[str], libvirt.virConnect]


def _quiet(_context: object, _error: object) -> None:
    """libvirt's C library prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet, None)


def open_uri(uri: str) -> libvirt.virConnect:
    return libvirt.open(uri)


class Connections:
    """Open libvirt connections and command runners per physical host of a cluster, lazily and once."""

    def __init__(self, cluster: Cluster, opener: Opener = open_uri, execute: Execute | None = None) -> None:
        self.cluster = cluster
        self.opener = opener
        self.execute = execute
        self._open: dict[str, libvirt.virConnect] = {}

    def uri(self, host: str) -> str:
        return self.cluster.site.hosts[host].uri

    def get(self, host: str) -> libvirt.virConnect:
        """The connection to ``host``; raises :class:`HostUnreachable` naming the host and its URI."""
        uri = self.uri(host)
        if uri in self._open and not _alive(self._open[uri]):
            # libvirtd restarted (an upgrade of libvirt does it) or dropped us: every later call on this connection
            # fails, and a night's `backup --all` would lose all the VMs after it. Open a new one.
            with suppress(libvirt.libvirtError):
                self._open[uri].close()
            del self._open[uri]
        if uri not in self._open:
            try:
                self._open[uri] = self.opener(uri)
            except libvirt.libvirtError as err:
                raise HostUnreachable(
                    f"host {host!r}: cannot connect to libvirt at {uri} ({err.get_error_message()});"
                    f" check [hosts.{host}] uri in {self.cluster.site.path} and that libvirtd runs there"
                ) from None
        return self._open[uri]

    def runner(self, host: str) -> Runner:
        """Where ``host``'s disk commands run (the machine its URI names)."""
        # Runner.execute is that field's default: the real commands, as runner_for_uri runs them unless told otherwise.
        return runner_for_uri(self.uri(host), self.execute or Runner.execute)

    def hosts_sharing_uri(self, host: str) -> set[str]:
        """Hosts whose URI is the same as ``host``'s (in the lab, every host is the one local daemon)."""
        uri = self.uri(host)
        return {name for name, h in self.cluster.site.hosts.items() if h.uri == uri}

    def close(self) -> None:
        for conn in self._open.values():
            with suppress(libvirt.libvirtError):  # a connection that broke mid-run has nothing left to close
                conn.close()
        self._open.clear()


def _alive(conn: libvirt.virConnect) -> bool:
    """Whether the daemon still answers: a round trip, as isAlive() notices a dropped connection only once a call
    on it has failed, and that call would be the next VM's."""
    try:
        conn.getLibVersion()
    except libvirt.libvirtError:
        return False
    return True


def one_line(err: libvirt.libvirtError) -> str:
    """libvirt's message on one line: QEMU's part of it may span several, and a report wants one per failure."""
    return " ".join(str(err).split())


class HostReport(Protocol):
    host: str
    error: str | None


@contextmanager
def failure_noted(report: HostReport) -> Iterator[None]:
    """Ask one host of a per-host report inside this block: a host that cannot be reached, or whose libvirt fails a
    call (its daemon gone mid-run), ends the block with the reason in ``report.error``, so that the other hosts are
    still asked and shown (`invoke status`, `plan`, `capacity`)."""
    try:
        yield
    except HostUnreachable as err:
        report.error = str(err)
    except libvirt.libvirtError as err:
        report.error = f"host {report.host!r}: libvirt failed: {one_line(err)}"


@contextmanager
def connections(cluster: Cluster, opener: Opener = open_uri, execute: Execute | None = None) -> Iterator[Connections]:
    conns = Connections(cluster, opener, execute)
    try:
        yield conns
    finally:
        conns.close()
