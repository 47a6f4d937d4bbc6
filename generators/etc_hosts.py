"""hosts: an /etc/hosts fragment (`ip fqdn name`) for every VM, in cluster.conf order, then the physical hosts."""

from __future__ import annotations

from pathlib import PurePosixPath

from generators.host_records import host_records
from generators.model import Cluster
from generators.render import render as render_template

TEMPLATE = "etc-hosts.j2"


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    return {PurePosixPath("hosts"): render_template(TEMPLATE, cluster, hosts=host_records(cluster))}
