"""The validated cluster model: frozen, typed, and the only thing generators see.

``cluster.conf`` and ``site.toml`` are parsed once (``inventory.py``, ``site.py``) and checked
as a whole (``validate.py``); every generator is a pure function of a :class:`Cluster`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from urllib.parse import urlsplit

from generators.errors import Location


class Install(StrEnum):
    """How a VM gets its operating system."""

    PXE = "pxe"  # network boot into the Debian/Ubuntu installer, answered by a preseed
    CLOUD = "cloud"  # qcow2 overlay on a cloud image, configured by a NoCloud seed ISO
    NONE = "none"  # the admin brings the disk content


class DiskKind(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    LVM = "lvm"


class Boot(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class NicKind(StrEnum):
    """What an extra NIC (`nic=` option) is on the host side."""

    BRIDGE = "bridge"  # a tap on a network's bridge (Linux bridge, or Open vSwitch with a VLAN tag on the port)
    MACVTAP = "macvtap"  # libvirt type='direct' on a host interface
    PCI = "pci"  # a whole PCI function passed through (libvirt <hostdev managed='yes'>)
    VF = "vf"  # an SR-IOV virtual function of a physical function


class DomainType(StrEnum):
    KVM = "kvm"  # hardware virtualisation, what real hosts use
    QEMU = "qemu"  # software emulation, for labs and CI where KVM cannot run guests


@dataclass(frozen=True)
class Disk:
    kind: DiskKind
    size_gb: int
    volume_group: str | None = None  # only for DiskKind.LVM


@dataclass(frozen=True)
class Nic:
    """One extra NIC of a VM, from a `nic=` option, in the order given.

    ``source`` is the network name (bridge), the host interface name or MAC (macvtap), the PCI
    address (pci) or the physical function's interface name (vf). ``mac`` is None only for pci,
    which passes a whole device through, and before validate.py derives the missing ones.
    """

    kind: NicKind
    source: str
    mode: str = ""  # macvtap: bridge, vepa, private or passthrough
    vf: int | None = None  # vf: the pinned VF's index; None lets libvirt pick a free VF of the PF
    mac: str | None = None


@dataclass(frozen=True)
class Vm:
    """One line of cluster.conf, validated."""

    name: str
    mac: str  # lower case, colon separated
    ip: IPv4Address
    ram_mb: int
    cpus: int
    disk: Disk
    hostgroups: tuple[str, ...]
    host: str  # physical host from site.toml (placed automatically when not given)
    network: str  # network from site.toml the primary NIC is on
    install: Install
    os: str  # key of [os.*] in site.toml
    boot: Boot
    cpuset: tuple[int, ...] = ()
    after: tuple[str, ...] = ()
    autostart: bool = True
    backup: bool = True
    keep: int | None = None  # restore points; None means site.toml's [backup] keep
    line: int = 0  # line in cluster.conf, for messages of later stages
    auto_placed: bool = False  # host chosen by `host=auto` placement, not written in cluster.conf
    nics: tuple[Nic, ...] = ()  # extra NICs after the primary one
    numa_node: int | None = None  # host NUMA node the VM's memory is bound to

    @property
    def mac_dashes(self) -> str:
        return self.mac.replace(":", "-")


@dataclass(frozen=True)
class Network:
    name: str
    subnet: IPv4Network
    bridge: str
    gateway: IPv4Address | None = None
    vlan: int | None = None
    dns_servers: tuple[IPv4Address, ...] = ()
    dhcp_ranges: tuple[tuple[IPv4Address, IPv4Address], ...] = ()
    ovs: bool = False  # the bridge is an Open vSwitch: the VLAN tag goes on the guest's port, not a tagged bridge

    @property
    def netmask(self) -> IPv4Address:
        return self.subnet.netmask


@dataclass(frozen=True)
class PhysicalHost:
    name: str
    uri: str  # libvirt connection URI, e.g. qemu:///system or qemu+ssh://root@kvm1/system
    ram_mb: int
    cpus: int
    disk_gb: int
    disk_dir: str
    ram_overcommit: float = 1.0
    cpu_overcommit: float = 1.0
    disk_overcommit: float = 1.0
    address: str | None = None
    interfaces: Mapping[str, str] = field(default_factory=dict)  # host NIC name -> its MAC ("" when not given)
    pci: tuple[str, ...] = ()  # PCI functions that may be passed through, e.g. 0000:1a:00.1
    sriov: Mapping[str, int] = field(default_factory=dict)  # physical function -> its number of VFs
    sriov_vfs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # PF -> VF PCI addresses, when listed
    housekeeping_cpus: tuple[int, ...] = ()  # CPUs for emulator threads, never pinned to a vCPU
    numa_nodes: int = 1
    network_stack: str = "ifupdown"  # how `fab kvm-setup` writes the bridges: ifupdown, netplan or networkmanager
    uplink: str = ""  # the NIC the bridges (and their VLAN subinterfaces) sit on; "" = bridges without a port
    nested: bool = False  # `fab kvm-setup` checks that nested virtualisation is on
    # Its [hosts.<name>] table in site.toml, for problems found after loading (e.g. by a generator).
    where: Location | None = field(default=None, compare=False, repr=False)
    # Its address and uri keys there, when set: a problem with the one of them that is at fault is shown at it.
    where_key: Mapping[str, Location] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ip(self) -> IPv4Address | IPv6Address | None:
        """``address`` if it is an IP address, else None (a DNS name, or no address)."""
        try:
            return ip_address(self.address) if self.address else None
        except ValueError:
            return None

    @property
    def ssh_address(self) -> str | None:
        """Where other machines reach this host over SSH: ``address``, else its remote URI's host; None if neither."""
        return self.address or uri_host(self.uri)

    @property
    def ssh_port(self) -> int:
        """The SSH port at ssh_address: a qemu+ssh URI's port when its host is used (``kvm1:2222``), else 22.

        Only an SSH transport's port is SSH's: qemu+tls://kvm1:16514 names libvirtd's TLS port.
        """
        if self.address or self.ssh_address is None:  # no URI host in use (uri_host also refuses broken URIs)
            return 22
        parts = urlsplit(self.uri)
        if not parts.scheme.endswith("+ssh"):
            return 22
        try:
            return parts.port or 22
        except ValueError:  # a port that is no number, or out of range: libvirt refuses such a URI too
            return 22


def uri_host(uri: str) -> str | None:
    """The machine a libvirt URI connects to: ``qemu+ssh://root@kvm1:2222/system`` -> ``kvm1``.

    None for a local URI (``qemu:///system``, ``qemu+unix:///...``, ``test:///...``) and for a loopback
    host: both mean whichever machine uses the URI, not one another machine can reach.
    """
    try:
        host = urlsplit(uri).hostname  # without user@ and :port, lowercased, [IPv6] unbracketed
    except ValueError:  # an unbalanced '[': no host libvirt could connect to either
        return None
    if not host or host == "localhost":
        return None
    try:
        return None if ip_address(host).is_loopback else host
    except ValueError:  # a name, not an IP address
        return host


@dataclass(frozen=True)
class OsRelease:
    """An installable OS: what PXE boots and which cloud image a cloud VM overlays."""

    name: str
    family: str  # debian | ubuntu
    suite: str  # bookworm, jammy, ...
    kernel: str  # path of the installer kernel, relative to the TFTP root
    initrd: str
    cloud_image: str | None = None  # base image path on the physical hosts


@dataclass(frozen=True)
class Provision:
    """The provision server: dnsmasq with TFTP, and HTTP for preseeds and cloud-init seeds."""

    server: IPv4Address | None  # None only until validate.py resolves it from `vm`
    http_url: str  # base URL, no trailing slash; preseeds are at {http_url}/preseed/{vm}.cfg
    tftp_root: str
    interface: str
    mirror_host: str
    mirror_dir: str
    mirror_proxy: str = ""
    config_dir: str = "/etc/kvmconf"  # where `invoke provision-server` keeps its build and state on the server
    vm: str | None = None  # the VM of cluster.conf that is the provision server, if one is
    # The name servers dnsmasq forwards names outside the cluster to; None: those of the server's /etc/resolv.conf.
    upstream_dns: tuple[IPv4Address, ...] | None = None


@dataclass(frozen=True)
class Accounts:
    root_password_hash: str  # crypt(3) SHA-512/yescrypt, or "!" for a locked account
    admin_user: str
    admin_password_hash: str
    ssh_keys: tuple[str, ...]
    ssh_user: str = "root"  # who `ssh <vm>` logs in as


@dataclass(frozen=True)
class Backup:
    schedule: str  # cron expression
    dir: str
    nas_dir: str | None
    keep: int
    full_every: int
    log: str
    checkout: str = "/root/kvmconf"  # this repository on the physical hosts, where cron runs `invoke backup`
    scratch_dir: str = "/var/tmp"  # a live backup's NBD socket and scratch files (copy-before-write)
    verify_schedule: str = "30 4 * * 0"  # cron expression of `invoke backup-verify --all`; "" for none


@dataclass(frozen=True)
class Site:
    domain: str
    domain_type: DomainType
    locale: str
    keyboard: str
    timezone: str
    networks: Mapping[str, Network]
    hosts: Mapping[str, PhysicalHost]
    oses: Mapping[str, OsRelease]
    default_network: str
    default_os: str
    provision: Provision
    accounts: Accounts
    backup: Backup
    # hostgroup name -> alias; None when site.toml does not list them (then any name is accepted)
    hostgroups: Mapping[str, str] | None = None
    path: str = "site.toml"


@dataclass(frozen=True)
class Cluster:
    site: Site
    vms: tuple[Vm, ...]  # in cluster.conf order, which is deployment order
    source: str = "cluster.conf"  # the inventory's path as given, for banners and messages
    _by_name: Mapping[str, Vm] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {vm.name: vm for vm in self.vms})

    def vm(self, name: str) -> Vm:
        return self._by_name[name]

    def fqdn(self, vm: Vm) -> str:
        return f"{vm.name}.{self.site.domain}"

    def network_of(self, vm: Vm) -> Network:
        return self.site.networks[vm.network]

    def host_of(self, vm: Vm) -> PhysicalHost:
        return self.site.hosts[vm.host]

    def os_of(self, vm: Vm) -> OsRelease:
        return self.site.oses[vm.os]

    @cached_property
    def hostgroups(self) -> dict[str, tuple[Vm, ...]]:
        """Every hostgroup used in cluster.conf, sorted, with its members in file order."""
        groups: dict[str, list[Vm]] = {}
        for vm in self.vms:
            for group in vm.hostgroups:
                groups.setdefault(group, []).append(vm)
        return {name: tuple(groups[name]) for name in sorted(groups)}

    def hostgroup_alias(self, group: str) -> str:
        known = self.site.hostgroups or {}
        return known.get(group, group)
