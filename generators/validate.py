"""Check the inventory as a whole against itself and site.toml, place VMs, build the Cluster.

Every problem is collected with the line and column it is about; nothing is raised until the
whole file has been seen, so the admin fixes everything in one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from generators.errors import ConfigError, Location, Problem
from generators.inventory import Row, read_rows
from generators.model import Boot, Cluster, Disk, DiskKind, Install, Site, Vm
from generators.site import load_site


def load_cluster(cluster_path: Path, site_path: Path) -> Cluster:
    """Parse and validate both files; raise ConfigError with every problem of both."""
    problems: list[Problem] = []
    site: Site | None = None
    try:
        site = load_site(site_path)
    except ConfigError as err:
        problems.extend(err.problems)
    rows, row_problems = read_rows(cluster_path)
    problems.extend(row_problems)
    if site is None:
        raise ConfigError(problems)
    checker = _Checker(str(cluster_path), site, problems)
    vms = checker.build(rows)
    if problems:
        raise ConfigError(problems)
    return Cluster(site=checker.site, vms=tuple(vms), source=str(cluster_path))


class _Checker:
    def __init__(self, path: str, site: Site, problems: list[Problem]) -> None:
        self.path = path
        self.site = site
        self.problems = problems

    def report(self, row: Row, column: str, message: str, option: str | None = None) -> None:
        col = row.option_cols[option] if option else row.cols.get(column, 1)
        self.problems.append(Problem(Location(self.path, row.line, col), f"column '{column}': {message}"))

    def build(self, rows: list[Row]) -> list[Vm]:
        good = [row for row in rows if row.ok]
        self._check_unique(good)
        self._check_after(good)
        vms = [vm for row in good if (vm := self._vm(row)) is not None]
        by_line = {row.line: row for row in good}
        self._resolve_provision(vms, by_line)
        self._check_addresses(vms, by_line)
        vms = self._place(vms, by_line)
        self._check_capacity(vms, by_line)
        self._check_cpusets(vms, by_line)
        return vms

    def _check_unique(self, rows: list[Row]) -> None:
        for column, what in (("name", "names"), ("mac", "MAC addresses"), ("ip", "IP addresses")):
            first: dict[object, int] = {}
            for row in rows:
                value = row.values[column]
                if value in first:
                    self.report(row, column, f"'{value}' is already used on line {first[value]} (expected unique {what})")
                else:
                    first[value] = row.line

    def _check_after(self, rows: list[Row]) -> None:
        seen: set[str] = set()
        for row in rows:
            for name in row.options.get("after", ()):
                if name not in seen:
                    self.report(row, "options", f"option 'after': {name!r} is not a VM defined above this line"
                                " (expected names of earlier VMs: cluster.conf order is deployment order)", "after")
            seen.add(row.values["name"])

    def _choice(self, row: Row, option: str, value: str, known: Iterable[str], what: str) -> bool:
        names = sorted(known)
        if value in names:
            return True
        self.report(row, "options", f"option {option!r}: {value!r} is not {what} in {self.site.path}"
                    f" (expected one of: {', '.join(names) or 'none defined'})", option)
        return False

    def _vm(self, row: Row) -> Vm | None:
        site, opts = self.site, row.options
        ok = True
        host = opts.get("host", "auto")
        if host != "auto":
            ok &= self._choice(row, "host", host, site.hosts, "a physical host")
        network = opts.get("net", site.default_network)
        if "net" in opts:
            ok &= self._choice(row, "net", network, site.networks, "a network")
        os_name = opts.get("os", site.default_os)
        if "os" in opts:
            ok &= self._choice(row, "os", os_name, site.oses, "an OS")
        install = opts.get("install", Install.PXE)
        if ok and install is Install.CLOUD and site.oses[os_name].cloud_image is None:
            where = "install" if "install" in opts else "name"
            message = (f"install=cloud needs a cloud image, and OS {os_name!r} has none"
                       f" (expected 'cloud_image' in [os.{os_name}] of {site.path})")
            if "install" in opts:
                self.report(row, "options", message, "install")
            else:
                self.report(row, where, message)
            ok = False
        hostgroups = row.values["hostgroups"]
        if site.hostgroups is not None:
            unknown = [g for g in hostgroups if g not in site.hostgroups]
            if unknown:
                self.report(row, "hostgroups", f"{','.join(unknown)!r} is not a hostgroup of {site.path}"
                            f" (expected one of: {', '.join(sorted(site.hostgroups))})")
                ok = False
        if not ok:
            return None
        kind, volume_group = opts.get("disk", (DiskKind.QCOW2, None))
        v = row.values
        return Vm(
            name=v["name"], mac=v["mac"], ip=v["ip"], ram_mb=v["ram"], cpus=v["cpus"],
            disk=Disk(kind, v["disk"], volume_group), hostgroups=hostgroups, host=host, network=network,
            install=install, os=os_name, boot=opts.get("boot", Boot.BIOS), cpuset=opts.get("cpuset", ()),
            after=opts.get("after", ()), autostart=opts.get("autostart", True), backup=opts.get("backup", True),
            keep=opts.get("keep"), line=row.line,
        )

    def _resolve_provision(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        provision = self.site.provision
        if provision.vm is None:
            return
        vm = next((vm for vm in vms if vm.name == provision.vm), None)
        if vm is None:
            if not any(row.values["name"] == provision.vm for row in rows.values()):
                self.problems.append(Problem(Location(self.site.path), f"key 'provision.vm': {provision.vm!r} is not"
                                             f" a VM of {self.path} (expected the name of the provision server VM)"))
            return
        self.site = dataclasses.replace(self.site, provision=dataclasses.replace(provision, server=vm.ip))

    def _check_addresses(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        server = self.site.provision.server
        for vm in vms:
            row, net = rows[vm.line], self.site.networks[vm.network]
            if vm.ip not in net.subnet:
                self.report(row, "ip", f"'{vm.ip}' is outside network {vm.network!r} ({net.subnet})"
                            f" (expected an address in {net.subnet})")
                continue
            reserved = {net.subnet.network_address: "the network address", net.subnet.broadcast_address:
                        "the broadcast address"}
            if net.gateway is not None:
                reserved[net.gateway] = "the gateway"
            if server is not None and vm.name != self.site.provision.vm:
                reserved.setdefault(server, "the provision server's address")
            if vm.ip in reserved:
                self.report(row, "ip", f"'{vm.ip}' is {reserved[vm.ip]} of network {vm.network!r}"
                            " (expected a host address of its own)")
            for first, last in net.dhcp_ranges:
                if first <= vm.ip <= last:
                    self.report(row, "ip", f"'{vm.ip}' is inside the dynamic DHCP range {first}-{last} of network"
                                f" {vm.network!r} (expected an address outside it)")

    def _capacity(self, host: str) -> tuple[float, float, float]:
        h = self.site.hosts[host]
        return h.ram_mb * h.ram_overcommit, h.cpus * h.cpu_overcommit, h.disk_gb * h.disk_overcommit

    def _place(self, vms: list[Vm], rows: dict[int, Row]) -> list[Vm]:
        """Place `host=auto` VMs, after the pinned ones, on the host with the most free RAM that fits.

        Deterministic: file order, ties broken by host name, so a rebuild never moves a VM.
        """
        used = {name: [0.0, 0.0, 0.0] for name in self.site.hosts}
        for vm in vms:
            if vm.host != "auto":
                for i, amount in enumerate((vm.ram_mb, vm.cpus, vm.disk.size_gb)):
                    used[vm.host][i] += amount
        placed = []
        for vm in vms:
            if vm.host == "auto":
                need = (vm.ram_mb, vm.cpus, vm.disk.size_gb)
                fits = [name for name in sorted(self.site.hosts)
                        if all(used[name][i] + need[i] <= self._capacity(name)[i] for i in range(3))]
                if not fits:
                    self.report(rows[vm.line], "name", f"{vm.name!r} fits on no physical host: needs {vm.ram_mb} MB"
                                f" RAM, {vm.cpus} vCPUs, {vm.disk.size_gb} GB disk (expected a host in"
                                f" {self.site.path} with that much free capacity, or host=<name>)")
                    continue
                best = min(fits, key=lambda name: (used[name][0] - self._capacity(name)[0], name))
                for i in range(3):
                    used[best][i] += need[i]
                vm = dataclasses.replace(vm, host=best, auto_placed=True)
            placed.append(vm)
        return placed

    def _check_capacity(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        totals: dict[str, list[float]] = {name: [0, 0, 0] for name in self.site.hosts}
        reported: set[tuple[str, int]] = set()
        for vm in vms:
            limits = self._capacity(vm.host)
            h = self.site.hosts[vm.host]
            for i, (column, amount, unit, size, ratio) in enumerate((
                ("ram", vm.ram_mb, "MB RAM", h.ram_mb, h.ram_overcommit),
                ("cpus", vm.cpus, "vCPUs", h.cpus, h.cpu_overcommit),
                ("disk", vm.disk.size_gb, "GB disk", h.disk_gb, h.disk_overcommit),
            )):
                totals[vm.host][i] += amount
                if totals[vm.host][i] > limits[i] and (vm.host, i) not in reported:
                    reported.add((vm.host, i))
                    self.report(rows[vm.line], column, f"{amount} puts host {vm.host!r} over capacity: its VMs"
                                f" up to this line need {totals[vm.host][i]:g} {unit} (expected at most"
                                f" {limits[i]:g} = {size} × overcommit {ratio:g})")

    def _check_cpusets(self, vms: list[Vm], rows: dict[int, Row]) -> None:
        owner: dict[tuple[str, int], str] = {}
        for vm in vms:
            if not vm.cpuset:
                continue
            row = rows[vm.line]
            if len(vm.cpuset) != vm.cpus:
                self.report(row, "options", f"option 'cpuset': has {len(vm.cpuset)} CPUs but the VM has"
                            f" {vm.cpus} vCPUs (expected exactly one host CPU per vCPU)", "cpuset")
            host_cpus = self.site.hosts[vm.host].cpus
            for cpu in vm.cpuset:
                if cpu >= host_cpus:
                    self.report(row, "options", f"option 'cpuset': CPU {cpu} does not exist on host {vm.host!r}"
                                f" (expected CPUs 0-{host_cpus - 1})", "cpuset")
                elif (vm.host, cpu) in owner:
                    self.report(row, "options", f"option 'cpuset': CPU {cpu} of host {vm.host!r} is already pinned"
                                f" to {owner[vm.host, cpu]!r} (expected CPUs no other VM on the host uses)", "cpuset")
                else:
                    owner[vm.host, cpu] = vm.name
