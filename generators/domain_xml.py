"""libvirt domain XML for every VM: build/libvirt/<vm>.xml, ready for `virsh define`.

Disk and seed paths come from generators.paths, which the provisioning code uses too. The UUID
is derived from the VM's FQDN, so rendering again (or on another machine) never changes it and
redefining a domain keeps its identity.
"""

from __future__ import annotations

import re
import uuid
from pathlib import PurePosixPath

from generators.model import Cluster, Install, Vm
from generators.paths import disk_path, seed_iso_path
from generators.render import banner_lines, environment

TEMPLATE = "domain.xml.j2"

# Fixed forever: changing it would change every domain's UUID, and libvirt refuses to redefine a
# domain under the same name with another UUID.
DOMAIN_UUID_NAMESPACE = uuid.UUID("15b3141f-7b0f-4726-a9e4-14f85a78bb32")


def domain_uuid(cluster: Cluster, vm: Vm) -> uuid.UUID:
    return uuid.uuid5(DOMAIN_UUID_NAMESPACE, cluster.fqdn(vm))


def _comment_safe(line: str) -> str:
    """XML forbids `--` inside a comment; the banner names user-chosen paths, which may hold it."""
    return re.sub(r"-(?=-)", "- ", line)


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    # One template object for all VMs: per-VM work is only .render() (10,000 VMs must stay cheap).
    template = environment().get_template(TEMPLATE)
    banner = [_comment_safe(line) for line in banner_lines(cluster, TEMPLATE)]
    return {
        PurePosixPath("libvirt", f"{vm.name}.xml"): template.render(
            cluster=cluster,
            site=cluster.site,
            banner=banner,
            vm=vm,
            fqdn=cluster.fqdn(vm),
            uuid=domain_uuid(cluster, vm),
            disk_path=disk_path(cluster, vm),
            seed_iso_path=seed_iso_path(cluster, vm) if vm.install is Install.CLOUD else None,
            bridge=cluster.network_of(vm).bridge,
        )
        for vm in cluster.vms
    }
