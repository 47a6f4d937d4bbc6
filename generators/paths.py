"""Where a VM's disk and seed ISO live on its physical host: the one place that decides it.

The domain XML points at these paths and the provisioning code creates the disks at them, so
both must call these functions rather than rebuild the paths.
"""

from __future__ import annotations

from posixpath import join

from generators.model import Cluster, DiskKind, Install, Vm


def lvm_volume_name(vm: Vm) -> str:
    """The logical volume's name inside its volume group (`lvcreate -n <this> <vg>`)."""
    # The prefix keeps our volumes apart from the host's own ones (root, swap, ...) in the same VG.
    return f"vm-{vm.name}"


def disk_path(cluster: Cluster, vm: Vm) -> str:
    """The primary disk: a file in the host's disk_dir, or the LV's device node for disk=lvm:<vg>."""
    if vm.disk.kind is DiskKind.LVM:
        if vm.disk.volume_group is None:
            raise RuntimeError(f"programming error: VM {vm.name!r} has an LVM disk without a volume group")
        return join("/dev", vm.disk.volume_group, lvm_volume_name(vm))
    suffix = ".qcow2" if vm.disk.kind is DiskKind.QCOW2 else ".img"
    return join(cluster.host_of(vm).disk_dir, vm.name + suffix)


def seed_iso_path(cluster: Cluster, vm: Vm) -> str | None:
    """The cloud-init NoCloud seed ISO (build/cloud-init/<vm>.iso copied to the host); None unless install=cloud.

    Only cloud VMs read a seed; the domain XML, provisioning and migration all ask here.
    """
    if vm.install is not Install.CLOUD:
        return None
    return join(cluster.host_of(vm).disk_dir, f"{vm.name}-seed.iso")
