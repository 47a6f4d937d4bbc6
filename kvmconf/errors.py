"""Failures an admin can act on; :func:`kvmconf.cli.user_errors` turns them into ``invoke.Exit`` with the message.

Bugs stay plain exceptions (and tracebacks): only these classes mean "you can fix this".
"""

from __future__ import annotations

from generators.errors import UsageError


class KvmconfError(Exception):
    """Something on a host or in the request is wrong; the message says what and the way out."""


class WrongUsage(KvmconfError, UsageError):
    """The command line names what is not there, or leaves out or combines options wrongly: exit status 2.

    A UsageError too, so every entry point exits 2 for it, as ``python -m generators`` does.
    """


class UnknownVm(WrongUsage):
    """A VM name given on the command line is not in cluster.conf."""


class UnknownHost(WrongUsage):
    """A physical host name given on the command line is not in site.toml."""


class HostUnreachable(KvmconfError):
    """libvirt on a physical host cannot be reached with the URI of site.toml."""


class CommandFailed(KvmconfError):
    """qemu-img, lvcreate, ... exited non-zero on a physical host."""


class DiskExists(KvmconfError):
    """A disk that provisioning would create is already there; it is never overwritten silently."""


class ProvisionBlocked(KvmconfError):
    """The plan found what would make provisioning fail (a disk in the way, no volume group): nothing was done."""


class ProvisionFailed(KvmconfError):
    """A provision run failed midway; what it had created was removed again."""
