"""The backup cron job: build/cron/kvmconf-backup, an /etc/cron.d file for the physical hosts.

Emitted only when at least one VM has backup=yes; with none, there is nothing for cron to run.
"""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

from generators.model import Cluster
from generators.render import render as render_template

TEMPLATE = "kvmconf-backup.cron.j2"


def cron_argument(text: str) -> str:
    """A path as one shell word of a cron command line.

    cron runs the command with /bin/sh (so quote spaces and the like) after turning every
    unescaped `%` into a newline (so escape it as `\\%`, see crontab(5)).
    """
    return shlex.quote(text).replace("%", "\\%")


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    covered: dict[str, list[str]] = {}
    for vm in cluster.vms:
        if vm.backup:
            covered.setdefault(vm.host, []).append(vm.name)
    if not covered:
        return {}
    backup = cluster.site.backup
    text = render_template(
        TEMPLATE,
        cluster,
        covered=sorted(covered.items()),
        excluded=[vm.name for vm in cluster.vms if not vm.backup],
        schedule=" ".join(backup.schedule.split()),
        checkout=cron_argument(backup.checkout),
        log=cron_argument(backup.log),
    )
    return {PurePosixPath("cron", "kvmconf-backup"): text}
