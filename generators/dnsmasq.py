"""dnsmasq on the provision server: build/dnsmasq/{dnsmasq.conf, dhcp-hosts/<vm>, hosts}.

dnsmasq.conf holds nothing per VM, so adding or removing a VM only changes files that dnsmasq
re-reads on SIGHUP (the dhcp-hostsfile directory and the addn-hosts file); SIGHUP never re-reads
the main configuration. The files are deployed to <config_dir>/dnsmasq/ (site.toml [provision]).

Their banners name the inputs by file name: a deploy compares these files with the running ones, and the way
the path to cluster.conf was written (`invoke` run from hosts/ reads ../cluster.conf) must not restart dnsmasq.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import PurePath, PurePosixPath
from posixpath import join

from generators import pxe
from generators.dns_zones import NS_NAME, ns_address
from generators.errors import Problem
from generators.host_records import host_records
from generators.model import Cluster, Network
from generators.render import banner_lines, environment
from generators.site import UPSTREAM_DNS_RULE
from generators.toml_reader import Locate

CONF_TEMPLATE = "dnsmasq.conf.j2"
HOST_TEMPLATE = "dhcp-host.j2"
HOSTS_TEMPLATE = "dnsmasq-hosts.j2"

OUT = PurePosixPath("dnsmasq")
HOSTS_DIR = OUT / "dhcp-hosts"


def dhcp_hosts_dir(cluster: Cluster) -> str:
    """Where build/dnsmasq/dhcp-hosts/ is deployed on the provision server."""
    return join(cluster.site.provision.config_dir, "dnsmasq", "dhcp-hosts")


def hosts_file(cluster: Cluster) -> str:
    """Where build/dnsmasq/hosts is deployed on the provision server."""
    return join(cluster.site.provision.config_dir, "dnsmasq", "hosts")


def dns_servers(cluster: Cluster, network: Network) -> tuple[IPv4Address, ...]:
    """The name servers DHCP hands out on a network: its own list, else the provision server (our dnsmasq)."""
    if network.dns_servers:
        return network.dns_servers
    server = cluster.site.provision.server
    if server is None:
        raise RuntimeError("programming error: provision.server is resolved by validate.py before generators run")
    return (server,)


def upstream_dns_problems(cluster: Cluster, locate: Locate) -> list[Problem]:
    """What is wrong with [provision] upstream_dns, or with its absence, once the server's address is known.

    dnsmasq never forwards to an address of its own (it logs "ignoring nameserver ... - local interface"), so a
    server whose upstream is itself answers no name outside the cluster: the installers' and apt's mirror included.
    Without upstream_dns, dnsmasq forwards to the servers of /etc/resolv.conf. For a provision VM, kvmconf writes
    that file itself (cloud-init's network-config: its network's name servers); when those are only the VM, the
    server is sure to be broken, so that is refused here, at `make`, rather than found when an install stalls.
    A provision server that is no VM ([provision] server) has a resolv.conf of the admin's making, which may name
    the site's resolvers: forwarding to it is kept, and the generated dnsmasq.conf says so.
    """
    provision, domain = cluster.site.provision, cluster.site.domain
    server = provision.server
    if server is None:
        return []  # an unknown provision VM, or one without an IP: reported by validate.py
    own = (f"the IP of the provision VM {provision.vm!r} in {cluster.source}" if provision.vm is not None
           else "[provision] server")
    if provision.upstream_dns is not None:
        if server not in provision.upstream_dns:
            return []
        return [Problem(locate("provision", "upstream_dns"), f"key 'provision.upstream_dns': '{server}' is the"
                        f" provision server's own address ({own}), to which dnsmasq never forwards (expected the"
                        f" name servers it forwards names outside {domain} to, other than itself)")]
    vm = next((vm for vm in cluster.vms if vm.name == provision.vm), None)
    if vm is None or dns_servers(cluster, cluster.network_of(vm)) != (server,):
        return []
    return [Problem(locate("provision", ""), f"table '[provision]' needs key 'upstream_dns': the provision VM"
                    f" {vm.name!r} has no name server but itself ({server}: network {vm.network!r} hands out no"
                    f" other), to which its dnsmasq never forwards, so no VM could resolve a name outside {domain}"
                    f" (expected upstream_dns = {UPSTREAM_DNS_RULE})")]


def tftp_names() -> dict[str, str]:
    """The TFTP root's names dnsmasq.conf hands out (dhcp-boot) or explains, as generators/pxe.py spells them."""
    return {
        "bios_boot_file": pxe.PXELINUX_BOOT_FILE,
        "bios_ldlinux": pxe.PXELINUX_LDLINUX,
        "pxelinux_mac_cfg": pxe.pxelinux_entry("<mac>"),
        "pxelinux_default": pxe.PXELINUX_DEFAULT,
        "grub_prefix": f"/{pxe.GRUB_DIR}",
        "grub_cfg": pxe.GRUB_CFG,
        "uefi_boot_file": pxe.GRUB_EFI_IMAGE,
    }


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    env = environment()
    site = cluster.site
    networks = [site.networks[name] for name in sorted(site.networks)]

    def by_name(template: str) -> dict[str, object]:  # the inputs by file name: see the module docstring
        return {"banner": banner_lines(cluster, template, by_name=True), "site_toml": PurePath(site.path).name}

    hosts = host_records(cluster)
    ns_ip = ns_address(cluster, hosts)  # the zones' NS name answers here too, with the same address
    tree: dict[PurePosixPath, str | bytes] = {
        OUT / "dnsmasq.conf": env.get_template(CONF_TEMPLATE).render(
            cluster=cluster, site=site, **by_name(CONF_TEMPLATE), provision=site.provision,
            networks=networks, dns_servers={net.name: dns_servers(cluster, net) for net in networks},
            dhcp_hosts_dir=dhcp_hosts_dir(cluster), hosts_file=hosts_file(cluster), tftp=tftp_names(),
        ),
        OUT / "hosts": env.get_template(HOSTS_TEMPLATE).render(
            cluster=cluster, site=site, **by_name(HOSTS_TEMPLATE),
            vms=sorted(cluster.vms, key=lambda vm: (vm.ip, vm.name)), hosts=hosts,
            ns_ip=ns_ip, ns_names=f"{NS_NAME}.{site.domain} {NS_NAME}",
            ns_line=ns_ip is not None and all(vm.ip != ns_ip for vm in cluster.vms) and all(
                host.ip != ns_ip for host in hosts),
        ),
    }
    # Fetched once, rendered per VM: this loop is what 10,000 VMs cost.
    host_template = env.get_template(HOST_TEMPLATE)
    host_banner = banner_lines(cluster, HOST_TEMPLATE, by_name=True)
    for vm in cluster.vms:
        tree[HOSTS_DIR / vm.name] = host_template.render(
            banner=host_banner, vm=vm
        )
    return tree
