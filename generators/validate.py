"""Check the inventory as a whole against itself and site.toml, place VMs, build the Cluster.

Every problem is collected with the line and column it is about; nothing is raised until the
whole file has been seen, so the admin fixes everything in one pass. A line with one bad field
is still checked for everything its other fields allow (a duplicate name is reported even when
the same line's IP is malformed); only checks that need a whole VM (placement, capacity, CPU
pinning) leave such lines out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from generators.ansible import GROUP_RULE, group_clash
from generators.dnsmasq import upstream_dns_problems
from generators.errors import ConfigError, Location, Problem, shown
from generators.inventory import Row, read_rows
from generators.model import Boot, Cluster, Disk, DiskKind, Install, Nic, NicKind, Site, Vm
from generators.site import load_site_located
from generators.site_values import MAX_DNS_NAME

_RESOURCES = (("ram", "MB RAM"), ("cpus", "vCPUs"), ("disk", "GB disk"))
# The names of Debian's own /etc/hosts (netbase): a VM named so would be this VM in ssh/config (`ssh localhost` from
# the admin's machine would log in to it), the hosts fragment and the cluster's DNS, and the machine itself there.
LOCAL_NAMES = ("localhost", "ip6-localhost", "ip6-loopback", "ip6-allnodes", "ip6-allrouters")


def load_cluster(cluster_path: Path, site_path: Path) -> Cluster:
    """Parse and validate both files; raise ConfigError with every problem of both."""
    problems: list[Problem] = []
    located = None
    try:
        located = load_site_located(site_path)
    except ConfigError as err:
        problems.extend(err.problems)
    rows, row_problems = read_rows(cluster_path)
    problems.extend(row_problems)
    _check_after(str(cluster_path), rows, problems)
    rows = [row for row in rows if row.cols]  # lines with a wrong field count have nothing more to check
    _check_unique(str(cluster_path), rows, problems)
    if located is None:  # checks against site.toml need a valid one
        raise ConfigError(problems)
    site, locate = located
    checker = _Checker(str(cluster_path), site, locate, problems, complete=not row_problems)
    vms = checker.build(rows)
    cluster = Cluster(site=checker.site, vms=tuple(vms), source=str(cluster_path))
    problems.extend(upstream_dns_problems(cluster, locate))  # needs the provision VM's address and network
    if problems:
        raise ConfigError(problems)
    return cluster


def _report(path: str, row: Row, column: str, message: str, option: str | None = None, offset: int = 0) -> Problem:
    col = row.option_cols[option] if option else row.cols.get(column, 1)
    return Problem(Location(path, row.line, col + offset), f"column '{column}': {message}")


def _check_unique(path: str, rows: list[Row], problems: list[Problem]) -> None:
    for column, what in (("name", "names"), ("mac", "MAC addresses"), ("ip", "IP addresses")):
        first: dict[object, int] = {}
        for row in rows:
            if column not in row.values:
                continue
            value = row.values[column]
            if value in first:
                problems.append(_report(path, row, column, f"'{value}' is already used on line {first[value]}"
                                        f" (expected unique {what})"))
            else:
                first[value] = row.line


def _check_after(path: str, rows: list[Row], problems: list[Problem]) -> None:
    seen: set[str] = set()
    for row in rows:
        offset = len("after=")
        for name in row.options.get("after", ()):
            if name not in seen:
                problems.append(_report(path, row, "options", f"option 'after': {name!r} is not a VM defined above"
                                        " this line (expected names of earlier VMs: cluster.conf order is"
                                        " deployment order)", "after", offset))
            offset += len(name) + 1
        if "name" in row.values:
            seen.add(row.values["name"])
        elif row.unsplit_name is not None:  # its problem is the field count: this name may well be right
            seen.add(row.unsplit_name)


@dataclasses.dataclass
class _Refs:
    """What a line's options resolve to in site.toml; None where the name is unknown there."""

    host: str | None
    network: str | None
    os: str | None
    install: Install | None
    known_hostgroups: bool = True


def _num(value: float) -> str:
    return f"{value:.12g}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


class _Checker:
    def __init__(self, path: str, site: Site, locate: Callable[[str, str], Location], problems: list[Problem],
                 complete: bool) -> None:
        self.path = path
        self.site = site
        self.locate = locate
        self.problems = problems
        self.complete = complete  # every line could be split into fields (no decode or field-count problem)
        self.capacity = {name: (h.ram_mb * h.ram_overcommit, h.cpus * h.cpu_overcommit, h.disk_gb * h.disk_overcommit)
                         for name, h in site.hosts.items()}
        self.known = {"host": sorted(["auto", *site.hosts]), "net": sorted(site.networks), "os": sorted(site.oses)}
        self.ansible_groups: dict[str, str] = {}  # Ansible group name -> the hostgroup it is, without [hostgroups]

    def report(self, row: Row, column: str, message: str, option: str | None = None, offset: int = 0) -> None:
        self.problems.append(_report(self.path, row, column, message, option, offset))

    def build(self, rows: list[Row]) -> list[Vm]:
        refs = {row.line: self._references(row) for row in rows}
        self._resolve_provision(rows)
        self._check_addresses(rows, refs)
        self._check_dns_names(rows)
        by_line = {row.line: row for row in rows}
        vms = [vm for row in rows if (vm := self._vm(row, refs[row.line])) is not None]
        vms = self._place(vms, by_line)
        self._check_capacity(vms, by_line)
        self._check_cpusets(vms, by_line)
        self._check_numa(vms, by_line)
        return self._check_nics(vms, by_line)

    def _choice(self, row: Row, option: str, what: str) -> str | None:
        """The value of option host=, net= or os= if site.toml defines it, else None and a problem."""
        value: str = row.options[option]
        names = self.known[option]
        if value in names:
            return value
        self.report(row, "options", f"option {option!r}: {value!r} is not {what} in {self.site.path}"
                    f" (expected one of: {', '.join(names) or 'none defined'})", option)
        return None

    def _references(self, row: Row) -> _Refs:
        """Resolve host=, net=, os= and the hostgroups against site.toml, reporting unknown names."""
        site, opts = self.site, row.options
        refs = _Refs(host="auto", network=site.default_network, os=site.default_os, install=Install.PXE)
        if "host" in opts:
            refs.host = self._choice(row, "host", "a physical host")
        if "net" in opts:
            refs.network = self._choice(row, "net", "a network")
        if "os" in opts:
            refs.os = self._choice(row, "os", "an OS")
        if "install" in row.option_cols:
            refs.install = opts.get("install")  # None when its value was malformed
        refs.install = self._check_install(row, refs.install, refs.os)
        self._check_bridge_nics(row)
        offset = 0
        for group in row.values.get("hostgroups", ()):
            if site.hostgroups is not None and group not in site.hostgroups:
                listed = ", ".join(sorted(site.hostgroups)) or "none listed"
                self.report(row, "hostgroups", f"{group!r} is not a hostgroup of {site.path} (expected one of:"
                            f" {listed}; or add it to [hostgroups])", offset=offset)
                refs.known_hostgroups = False
            # [hostgroups] checks its names itself; without it, the first line to use a name is where it is declared.
            elif site.hostgroups is None and (clash := group_clash(group, site.hosts, self.ansible_groups)):
                self.report(row, "hostgroups", f"{group!r} would be {clash} in ansible/inventory.ini (expected"
                            f" {GROUP_RULE})", offset=offset)
                refs.known_hostgroups = False
            offset += len(group) + 1
        return refs

    def _check_bridge_nics(self, row: Row) -> None:
        """A bridge NIC's network: site.toml's, whichever host the VM gets, so said even when host= is unknown."""
        nics, cols = row.options.get("nic", ()), row.repeat_cols.get("nic", ())
        if len(nics) != len(cols):  # a malformed nic= is reported already, and which column is whose is unknown
            return
        for nic, col in zip(nics, cols, strict=True):
            if nic.kind is NicKind.BRIDGE and nic.source not in self.site.networks:
                self.problems.append(Problem(Location(self.path, row.line, col), "column 'options': option 'nic':"
                                             f" {nic.source!r} is not a network in {self.site.path} (expected one of:"
                                             f" {', '.join(sorted(self.site.networks))})"))

    def _check_install(self, row: Row, install: Install | None, os: str | None) -> Install | None:
        """The line's install= if the VM can be installed that way, else None and a problem."""
        site, opts = self.site, row.options
        if install is Install.CLOUD and os is not None and site.oses[os].cloud_image is None:
            message = (f"install=cloud needs a cloud image, and OS {os!r} has none"
                       f" (expected 'cloud_image' in [os.{os}] of {site.path})")
            self.report(row, "options", message, "install")
            return None
        kind, volume_group = opts.get("disk", (DiskKind.QCOW2, None))
        if install is Install.CLOUD and kind is not DiskKind.QCOW2:
            # kvmconf.disks makes only a qcow2 disk as an overlay on the cloud image: any other stays empty.
            disk = f"lvm:{volume_group}" if volume_group else kind.value
            self.report(row, "options", f"option 'disk': {disk!r} cannot hold install=cloud's image, which only a"
                        " qcow2 overlay gets (expected disk=qcow2 with install=cloud; raw and LVM disks with"
                        " install=pxe or none)", "disk")
            return None
        explicit = "install" in row.option_cols
        pxe = f"install=pxe{'' if explicit else ' (the default)'}"
        if install is Install.PXE and os is not None and site.oses[os].family != "debian":
            # Only Debian's installer reads the generated preseed, and only its kernels reach the TFTP root.
            self.report(row, "options", f"{pxe} needs Debian's installer, and OS {os!r} is of family"
                        f" {site.oses[os].family!r} (expected install=cloud or install=none with it, or an OS of"
                        " family debian)", "install" if explicit else "os" if "os" in row.option_cols else None)
            return None
        if install is Install.PXE and site.provision.vm is not None and row.values.get("name") == site.provision.vm:
            # Its installer, preseed and DHCP answer would come from the server it is about to become.
            self.report(row, "options", f"{pxe} would install the provision VM ([provision] vm in {site.path}) from"
                        " itself (expected install=cloud, or install=none for a VM installed by other means)",
                        "install" if explicit else None)
            return None
        return install

    def _vm(self, row: Row, refs: _Refs) -> Vm | None:
        if not row.ok or not refs.known_hostgroups or None in (refs.host, refs.network, refs.os, refs.install):
            return None
        assert refs.host and refs.network and refs.os and refs.install  # for mypy: checked just above
        opts, v = row.options, row.values
        kind, volume_group = opts.get("disk", (DiskKind.QCOW2, None))
        return Vm(
            name=v["name"], mac=v["mac"], ip=v["ip"], ram_mb=v["ram"], cpus=v["cpus"],
            disk=Disk(kind, v["disk"], volume_group), hostgroups=v["hostgroups"], host=refs.host,
            network=refs.network, install=refs.install, os=refs.os, boot=opts.get("boot", Boot.BIOS),
            cpuset=opts.get("cpuset", ()), after=opts.get("after", ()), autostart=opts.get("autostart", True),
            backup=opts.get("backup", True), keep=opts.get("keep"), line=row.line, nics=opts.get("nic", ()),
            numa_node=opts.get("numa"),
        )

    def _resolve_provision(self, rows: list[Row]) -> None:
        """With `[provision] vm = NAME`, the provision server's address is that VM's IP."""
        provision = self.site.provision
        if provision.vm is None:
            return
        row = next((row for row in rows if row.values.get("name") == provision.vm), None)
        if row is None:
            if self.complete:  # else the VM may be on a line that could not be read
                self.problems.append(Problem(self.locate("provision", "vm"), f"key 'provision.vm': {provision.vm!r}"
                                             f" is not a VM of {self.path} (expected the name of the VM that is"
                                             " the provision server)"))
            return
        if "ip" in row.values:
            provision = dataclasses.replace(provision, server=row.values["ip"])
            self.site = dataclasses.replace(self.site, provision=provision)

    def _check_addresses(self, rows: list[Row], refs: dict[int, _Refs]) -> None:
        # With `[provision] vm =`, the server's address is that VM's IP, which the check of unique IPs covers.
        server = self.site.provision.server if self.site.provision.vm is None else None
        # A physical host's IP is its name's address in the cluster's DNS (generators/host_records.py): a VM there
        # would get the host's traffic and a second PTR. (The provision server may well be a host: no clash.)
        hosts = {host_address: f"the address of physical host {name!r} ([hosts.{name}] address at"
                               f" {host.where_key.get('address') or self.site.path})"
                 for name, host in self.site.hosts.items() if (host_address := host.ip) is not None}
        for row in rows:
            ip: IPv4Address | None = row.values.get("ip")
            network = refs[row.line].network
            if ip is None or network is None:
                continue
            net = self.site.networks[network]
            if ip not in net.subnet:
                self.report(row, "ip", f"'{ip}' is outside network {network!r} ({net.subnet}) (expected an address"
                            f" in {net.subnet}{'' if 'net' in row.options else ', or net=<network>'})")
                continue
            reserved = {net.subnet.network_address: f"the network address of network {network!r}",
                        net.subnet.broadcast_address: f"the broadcast address of network {network!r}"}
            if net.gateway is not None:
                reserved[net.gateway] = f"the gateway of network {network!r}"
            if server is not None:
                reserved.setdefault(server, f"the provision server's address ([provision] server in {self.site.path})")
            clash = reserved.get(ip) or hosts.get(ip)
            if clash is not None:
                self.report(row, "ip", f"'{ip}' is {clash} (expected a host address of its own)")
            for first, last in net.dhcp_ranges:
                if first <= ip <= last:
                    self.report(row, "ip", f"'{ip}' is inside the dynamic DHCP range {first}-{last} of network"
                                f" {network!r} (expected an address outside it)")

    def _check_dns_names(self, rows: list[Row]) -> None:
        """Each VM is NAME.DOMAIN in DNS, which dnsmasq and the zone files cannot hold beyond 253 characters.

        A physical host is NAME.DOMAIN there too (generators/host_records.py), so a VM may not have its name; DNS
        names are case-insensitive, and site.toml's host names, unlike VMs', may have capitals.
        """
        domain = self.site.domain
        hosts = {name.lower(): host for name, host in self.site.hosts.items()}
        for row in rows:
            name = row.values.get("name")
            if name is not None and (host := hosts.get(name)) is not None:
                self.report(row, "name", f"{name!r} is also the name of physical host {host.name!r} ([hosts."
                            f"{host.name}] at {host.where or self.site.path}) (expected a name of its own: DNS names"
                            f" ignore case, and a host with an IP address is {name}.{domain} in the cluster's DNS)")
            if name in LOCAL_NAMES:
                self.report(row, "name", f"{name!r} is a name of every machine's own /etc/hosts (expected another"
                            f" name than {', '.join(LOCAL_NAMES)}: `ssh {name}` would reach this VM, and the hosts"
                            " fragment and DNS would contradict that file)")
            if name is not None and (length := len(f"{name}.{domain}")) > MAX_DNS_NAME:
                self.report(row, "name", f"{name!r} with domain {shown(domain)} makes a DNS name of {length}"
                            f" characters (expected at most {MAX_DNS_NAME} in NAME.DOMAIN: a shorter name or"
                            " domain)")

    def _place(self, vms: list[Vm], rows: dict[int, Row]) -> list[Vm]:
        """Place `host=auto` VMs on the host with the most free RAM that fits them.

        Only the VMs above a line count, so appending VMs to cluster.conf never moves one that is
        already placed (moving it would define it twice). Ties go to the first host by name.
        """
        used = {name: [0.0, 0.0, 0.0] for name in self.site.hosts}
        host_names = sorted(self.site.hosts)
        placed = []
        for vm in vms:
            need = (vm.ram_mb, vm.cpus, vm.disk.size_gb)
            if vm.host == "auto":
                best, most_free = None, 0.0
                for name in host_names:  # a plain loop: this runs hosts x VMs times
                    u, cap = used[name], self.capacity[name]
                    free = cap[0] - u[0]
                    if need[0] <= free and u[1] + need[1] <= cap[1] and u[2] + need[2] <= cap[2] and (
                            best is None or free > most_free):
                        best, most_free = name, free
                if best is None:
                    self.report(rows[vm.line], "name", f"{vm.name!r} fits on no physical host: needs {vm.ram_mb} MB"
                                f" RAM, {_count(vm.cpus, 'vCPU')} and {vm.disk.size_gb} GB disk, more than any host"
                                f" has left (expected a host in {self.site.path} with that much free capacity after"
                                " the VMs above, or host=<name>)")
                    continue
                vm = dataclasses.replace(vm, host=best, auto_placed=True)
            for i in range(3):
                used[vm.host][i] += need[i]
            placed.append(vm)
        return placed

    def _check_capacity(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        """Report the line whose VM first takes a host over its capacity × overcommit."""
        totals: dict[str, list[float]] = {name: [0, 0, 0] for name in self.site.hosts}
        auto: dict[str, list[str]] = {name: [] for name in self.site.hosts}
        reported: set[tuple[str, int]] = set()
        for vm in vms:
            limits = self.capacity[vm.host]
            h = self.site.hosts[vm.host]
            if vm.auto_placed:
                auto[vm.host].append(vm.name)
            for i, (amount, size, ratio) in enumerate((
                (vm.ram_mb, h.ram_mb, h.ram_overcommit),
                (vm.cpus, h.cpus, h.cpu_overcommit),
                (vm.disk.size_gb, h.disk_gb, h.disk_overcommit),
            )):
                totals[vm.host][i] += amount
                if totals[vm.host][i] > limits[i] and (vm.host, i) not in reported:
                    reported.add((vm.host, i))
                    column, unit = _RESOURCES[i]
                    note = ""
                    if auto[vm.host]:  # pinning one of those elsewhere may be the easiest fix
                        names = ", ".join(auto[vm.host][:3]) + (", ..." if len(auto[vm.host]) > 3 else "")
                        note = f"; host=auto put {names} there: pin one elsewhere with host=<name>"
                    self.report(rows[vm.line], column, f"{amount} puts host {vm.host!r} over capacity: its VMs up to"
                                f" this line need {_num(totals[vm.host][i])} {unit} (expected at most"
                                f" {_num(limits[i])} = {size} × overcommit {_num(ratio)}{note})")

    def _check_cpusets(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        owner: dict[tuple[str, int], str] = {}
        for vm in vms:
            if not vm.cpuset:
                continue
            row = rows[vm.line]
            if len(vm.cpuset) != vm.cpus:
                self.report(row, "options", f"option 'cpuset': has {_count(len(vm.cpuset), 'CPU')} but the VM has"
                            f" {_count(vm.cpus, 'vCPU')} (expected exactly one host CPU per vCPU)", "cpuset")
            if vm.auto_placed:
                # CPU numbers mean something only on a known host, and host=auto may move the VM.
                self.report(row, "options", "option 'cpuset': pins CPUs of no particular host (expected"
                            f" host=<name> with it; host=auto chose {vm.host!r})", "cpuset")
                continue
            host_cpus = self.site.hosts[vm.host].cpus
            missing = [cpu for cpu in vm.cpuset if cpu >= host_cpus]
            if missing:
                verb = "does" if len(missing) == 1 else "do"
                self.report(row, "options", f"option 'cpuset': {_cpus(missing)} {verb} not exist on host {vm.host!r}"
                            f" (expected CPUs 0-{host_cpus - 1})", "cpuset")
            housekeeping = [cpu for cpu in vm.cpuset if cpu in self.site.hosts[vm.host].housekeeping_cpus]
            if housekeeping:
                verb = "is" if len(housekeeping) == 1 else "are"
                self.report(row, "options", f"option 'cpuset': {_cpus(housekeeping)} of host {vm.host!r} {verb}"
                            f" reserved for housekeeping (expected CPUs outside [hosts.{vm.host}]"
                            " housekeeping_cpus)", "cpuset")
            taken: dict[str, list[int]] = {}  # other VM -> CPUs of this cpuset it has pinned already
            for cpu in vm.cpuset:
                if cpu < host_cpus:
                    if (vm.host, cpu) in owner:
                        taken.setdefault(owner[vm.host, cpu], []).append(cpu)
                    else:
                        owner[vm.host, cpu] = vm.name
            for other, cpus in taken.items():
                verb = "is" if len(cpus) == 1 else "are"
                self.report(row, "options", f"option 'cpuset': {_cpus(cpus)} of host {vm.host!r} {verb} already"
                            f" pinned to {other!r} (expected CPUs no other VM on the host uses)", "cpuset")


    def _check_numa(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        for vm in vms:
            nodes = self.site.hosts[vm.host].numa_nodes
            if vm.numa_node is not None and vm.numa_node >= nodes:
                self.report(rows[vm.line], "options", f"option 'numa': host {vm.host!r} has no NUMA node"
                            f" {vm.numa_node} (expected 0-{nodes - 1}; see [hosts.{vm.host}] numa_nodes)", "numa")

    def _check_nics(self, vms: list[Vm], rows: dict[int, Row]) -> list[Vm]:
        """Resolve each extra NIC against its host and give it a MAC; report what the host cannot offer."""
        macs = {vm.mac: vm.name for vm in vms}
        pci_owner: dict[tuple[str, str], str] = {}  # (host, PCI function) -> VM; pinned VFs count too
        vf_users: dict[tuple[str, str], list[str]] = {}  # (host, PF) -> VMs, one entry per VF
        macvtaps: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (host, interface) -> (VM, mode) of each NIC
        result = []
        for vm in vms:
            if not vm.nics:
                result.append(vm)
                continue
            row, host = rows[vm.line], self.site.hosts[vm.host]
            placed = f"; host=auto chose {vm.host!r}" if vm.auto_placed else ""
            nics = []
            for number, (nic, col) in enumerate(zip(vm.nics, row.repeat_cols["nic"], strict=True), 1):
                def report(message: str, col: int = col, line: int = row.line) -> None:
                    self.problems.append(Problem(Location(self.path, line, col),
                                                 f"column 'options': option 'nic': {message}"))

                if nic.kind is NicKind.MACVTAP:  # a bridge NIC's network: _check_bridge_nics
                    by_mac = {mac: name for name, mac in host.interfaces.items() if mac}
                    name = by_mac.get(nic.source, nic.source)
                    if name not in host.interfaces:
                        what = "no interface of host" if nic.source in by_mac or ":" in nic.source else "not an" \
                            " interface of host"
                        report(f"{nic.source!r} is {what} {vm.host!r} (expected one of:"
                               f" {', '.join(sorted(host.interfaces)) or 'none listed'} from [hosts.{vm.host}]"
                               f" interfaces in {self.site.path}{placed})")
                    else:
                        self._check_macvtap(vm, name, nic.mode, report, macvtaps)
                    nic = dataclasses.replace(nic, source=name)
                elif nic.kind is NicKind.PCI:
                    if nic.source not in host.pci:
                        report(f"{nic.source!r} is not a PCI function of host {vm.host!r} (expected one of:"
                               f" {', '.join(host.pci) or 'none listed'} from [hosts.{vm.host}] pci in"
                               f" {self.site.path}{placed})")
                    elif (vm.host, nic.source) in pci_owner:
                        report(f"PCI function {nic.source} of host {vm.host!r} is already given to"
                               f" {pci_owner[vm.host, nic.source]!r} (expected each PCI function on one VM only)")
                    else:
                        pci_owner[vm.host, nic.source] = vm.name
                elif nic.kind is NicKind.VF:
                    self._check_vf(vm, nic, report, pci_owner, vf_users, placed)
                if nic.kind is not NicKind.PCI:
                    if nic.mac is None:
                        nic = dataclasses.replace(nic, mac=derived_mac(vm.mac, number))
                    assert nic.mac is not None  # for mypy
                    if nic.mac in macs:
                        report(f"MAC {nic.mac} is already used by {macs[nic.mac]!r} (expected unique MAC addresses;"
                               " give this NIC one with /<mac>)")
                    macs[nic.mac] = vm.name
                nics.append(nic)
            result.append(dataclasses.replace(vm, nics=tuple(nics)))
        return result

    def _bridge_ports(self, host: str) -> dict[str, str]:
        """The host's interfaces that fab kvm-setup makes a port of a Linux bridge -> that bridge's network:
        its uplink under an untagged network's bridge, <uplink>.<vlan> under a tagged one's."""
        uplink = self.site.hosts[host].uplink
        ports: dict[str, str] = {}
        for name, network in self.site.networks.items():
            if uplink and not network.ovs:
                ports.setdefault(f"{uplink}.{network.vlan}" if network.vlan else uplink, name)
        return ports

    def _check_macvtap(self, vm: Vm, interface: str, mode: str, report: Callable[[str], None],
                       macvtaps: dict[tuple[str, str], list[tuple[str, str]]]) -> None:
        """What the kernel refuses when the VM starts (checked with `ip link add ... type macvtap`): a macvtap on
        a bridge port (EBUSY), and a passthrough macvtap beside any other macvtap on its interface (EINVAL)."""
        network = self._bridge_ports(vm.host).get(interface)
        if network is not None:
            report(f"interface {interface!r} of host {vm.host!r} is a port of bridge"
                   f" {self.site.networks[network].bridge!r} (network {network!r}; fab kvm-setup puts it there, from"
                   f" [hosts.{vm.host}] uplink), and the kernel puts no macvtap on a bridge port (expected another"
                   f" interface, or nic=bridge:{network})")
            return
        users = macvtaps.setdefault((vm.host, interface), [])
        whole = next((user for user, user_mode in users if user_mode == "passthrough"), None)
        if whole is not None:
            report(f"interface {interface!r} of host {vm.host!r} is taken whole by the macvtap passthrough NIC of"
                   f" {whole!r} (expected no other macvtap NIC on an interface in passthrough mode)")
        elif mode == "passthrough" and users:
            report(f"macvtap passthrough takes interface {interface!r} of host {vm.host!r} whole, and {users[0][0]!r}"
                   " has a macvtap NIC on it already (expected no other macvtap NIC on an interface in passthrough"
                   " mode)")
        users.append((vm.name, mode))

    def _check_vf(self, vm: Vm, nic: Nic, report: Callable[[str], None], pci_owner: dict[tuple[str, str], str],
                  vf_users: dict[tuple[str, str], list[str]], placed: str) -> None:
        host = self.site.hosts[vm.host]
        count = host.sriov.get(nic.source)
        if count is None:
            report(f"{nic.source!r} is not an SR-IOV physical function of host {vm.host!r} (expected one of:"
                   f" {', '.join(sorted(host.sriov)) or 'none listed'} from [hosts.{vm.host}] sriov in"
                   f" {self.site.path}{placed})")
            return
        users = vf_users.setdefault((vm.host, nic.source), [])
        users.append(vm.name)
        if len(users) > count:
            report(f"{nic.source} of host {vm.host!r} has {_count(count, 'VF')} and the VMs up to this line use"
                   f" {len(users)} (expected at most {count}; see [hosts.{vm.host}] sriov)")
            return
        if nic.vf is None:
            return
        if nic.vf >= count:
            report(f"{nic.source} of host {vm.host!r} has no VF {nic.vf} (expected 0-{count - 1})")
        elif nic.source not in host.sriov_vfs:
            report(f"pins VF {nic.vf} of {nic.source}, whose VF addresses {self.site.path} does not list (expected"
                   f" [hosts.{vm.host}] sriov = {{{nic.source} = [\"dddd:bb:ss.f\", ...]}}, or vf:{nic.source}"
                   " without an index)")
        else:
            address = host.sriov_vfs[nic.source][nic.vf]
            if (vm.host, address) in pci_owner:
                report(f"VF {nic.vf} of {nic.source} ({address}) on host {vm.host!r} is already given to"
                       f" {pci_owner[vm.host, address]!r} (expected each PCI function on one VM only)")
            else:
                pci_owner[vm.host, address] = vm.name


def derived_mac(mac: str, number: int) -> str:
    """The n-th extra NIC's MAC: the VM's MAC with 4·n added to the first byte.

    Adding a multiple of 4 keeps the two low bits, so the MAC stays unicast and locally
    administered (52:54:00:... → 56:54:00:..., 5a:54:00:...); stable as long as the VM's MAC is.
    """
    first = (int(mac[:2], 16) + 4 * number) % 256
    return f"{first:02x}{mac[2:]}"


def _cpus(cpus: list[int]) -> str:
    """'CPU 7' or 'CPUs 6, 7'."""
    return f"CPU {cpus[0]}" if len(cpus) == 1 else f"CPUs {', '.join(map(str, cpus))}"
