"""libvirt's job on a domain: whether one runs and what it does.

libvirt runs one job per domain at a time (a backup, a migration, ...). A second one waits 30 s for the
first, then fails saying only that it could not acquire a lock, and ``abortJob`` aborts whichever job runs,
ours or another tool's: backups and migrations look first, and abort only a job they know is theirs.
"""

from __future__ import annotations

from contextlib import suppress

import libvirt

from kvmconf.waiting import wait_until

_OPERATION_PREFIX = "VIR_DOMAIN_JOB_OPERATION_"


def active(dom: libvirt.virDomain) -> bool:
    """Whether a job runs on the domain (False when libvirt cannot say: the domain is gone, ...)."""
    try:
        return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return False


def operation(dom: libvirt.virDomain) -> int:
    """The active job's VIR_DOMAIN_JOB_OPERATION_* (0, UNKNOWN, when none runs or libvirt cannot say)."""
    with suppress(libvirt.libvirtError):
        return int(dom.jobStats().get("operation", 0))
    return 0


def describe(dom: libvirt.virDomain) -> str:
    """What the active job does, for the admin: "operation: backup", "operation: migration out", ..."""
    code = operation(dom)
    names = [n for n in dir(libvirt) if n.startswith(_OPERATION_PREFIX) and getattr(libvirt, n) == code]
    if code and names:
        return "operation: " + names[0].removeprefix(_OPERATION_PREFIX).lower().replace("_", " ")
    return "libvirt does not say which"


def wait_until_ended(dom: libvirt.virDomain, timeout: float) -> bool:
    """Wait for the domain's job to end (an aborted one takes a moment); whether it did within ``timeout`` s."""
    return wait_until(lambda: not active(dom), timeout)
