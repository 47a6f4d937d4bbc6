"""URLs the provision server serves, built in one place so the kernel command lines, the preseeds
and the server's own HTTP handler cannot disagree about them.

``[provision] http_url`` has no trailing slash (site_values.read_http_url strips it).
"""

from __future__ import annotations

from generators.model import Cluster, Vm


def preseed_url(cluster: Cluster, vm: Vm) -> str:
    """The VM's preseed (build/preseed/<vm>.cfg), given to the installer as ``url=`` on its kernel line."""
    return f"{cluster.site.provision.http_url}/preseed/{vm.name}.cfg"


def installed_url(cluster: Cluster, vm: Vm) -> str:
    """Fetched by the installer's late_command when the install is done, so the server can flip the VM to
    local boot (remove its per-MAC TFTP entries) before it comes back through PXE."""
    return f"{cluster.site.provision.http_url}/installed/{vm.name}"
