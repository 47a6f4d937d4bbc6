"""ssh/config: a `Host <name> <fqdn>` block per VM, in cluster.conf order, included from ~/.ssh/config.

Host keys go to their own file, KNOWN_HOSTS, so the cluster's keys (filled by a keyscan task) do not
mix with the user's; StrictHostKeyChecking is left at ssh's default, never `no`.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from generators.model import Cluster
from generators.render import render as render_template

KNOWN_HOSTS = "~/.ssh/kvmconf_known_hosts"
TEMPLATE = "ssh_config.j2"


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    # One render for the whole file: a loop inside the template, not a template call per VM.
    return {PurePosixPath("ssh/config"): render_template(TEMPLATE, cluster, known_hosts=KNOWN_HOSTS)}
