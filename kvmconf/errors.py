"""Failures an admin can act on; ``tasks.py`` turns them into ``invoke.Exit`` with the message.

Bugs stay plain exceptions (and tracebacks): only these classes mean "you can fix this".
"""

from __future__ import annotations


class KvmconfError(Exception):
    """Something on a host or in the request is wrong; the message says what and the way out."""


class UnknownVm(KvmconfError):
    """A VM name given on the command line is not in cluster.conf."""


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
