"""libvirt domain XML for every VM: build/libvirt/<vm>.xml, ready for `virsh define`.

Disk and seed paths come from generators.paths, which the provisioning code uses too. The UUID
is derived from the VM's FQDN, so rendering again (or on another machine) never changes it and
redefining a domain keeps its identity.
"""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Any

from generators.model import Cluster, NicKind, Vm
from generators.paths import disk_path, seed_iso_path
from generators.render import environment, xml_banner

TEMPLATE = "domain.xml.j2"

# Fixed forever: changing it would change every domain's UUID, and libvirt refuses to redefine a
# domain under the same name with another UUID.
DOMAIN_UUID_NAMESPACE = uuid.UUID("15b3141f-7b0f-4726-a9e4-14f85a78bb32")


def domain_uuid(cluster: Cluster, vm: Vm) -> uuid.UUID:
    return uuid.uuid5(DOMAIN_UUID_NAMESPACE, cluster.fqdn(vm))


def vf_pool_network(pf: str) -> str:
    """The libvirt network (forward mode='hostdev' on ``pf``) from which libvirt picks a free VF."""
    return f"vf-{pf}"


def cpu_list(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5': the form libvirt writes back, so a read-back compares equal."""
    parts: list[str] = []
    for cpu in sorted(cpus):
        if parts and cpu == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def _pci(address: str) -> tuple[str, str, str, str]:
    """'0000:1a:00.1' -> ('0x0000', '0x1a', '0x00', '0x1'), the attributes of libvirt's <address>."""
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    return f"0x{domain}", f"0x{bus}", f"0x{slot}", f"0x{function}"


def _nics(cluster: Cluster, vm: Vm) -> list[dict[str, Any]]:
    """What the template needs of each extra NIC (most VMs have none: no work then)."""
    views = []
    host = cluster.host_of(vm)
    for nic in vm.nics:
        view: dict[str, Any] = {"kind": nic.kind, "mac": nic.mac, "source": nic.source, "mode": nic.mode,
                                "vf": nic.vf, "pci": None}
        if nic.kind is NicKind.BRIDGE:
            view["network"] = cluster.site.networks[nic.source]
        elif nic.kind is NicKind.PCI:
            view["pci"] = _pci(nic.source)
        elif nic.kind is NicKind.VF:
            if nic.vf is not None:
                view["pci"] = _pci(host.sriov_vfs[nic.source][nic.vf])
            view["pool"] = vf_pool_network(nic.source)
        views.append(view)
    return views


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    # One template object for all VMs: per-VM work is only .render() (10,000 VMs must stay cheap).
    template = environment().get_template(TEMPLATE)
    banner = xml_banner(cluster, TEMPLATE)
    return {
        PurePosixPath("libvirt", f"{vm.name}.xml"): template.render(
            cluster=cluster,
            site=cluster.site,
            banner=banner,
            vm=vm,
            fqdn=cluster.fqdn(vm),
            uuid=domain_uuid(cluster, vm),
            disk_path=disk_path(cluster, vm),
            seed_iso_path=seed_iso_path(cluster, vm),
            network=cluster.network_of(vm),
            nics=_nics(cluster, vm) if vm.nics else (),
            housekeeping=cpu_list(cluster.host_of(vm).housekeeping_cpus) if vm.cpuset else "",
        )
        for vm in cluster.vms
    }
