"""`fab kvm-setup`: prepare a physical host of site.toml for its VMs, idempotently, like update-confs.

Steps: packages (QEMU/KVM, libvirt, the network stack's tools), /etc/sysctl.d + /etc/modules-load.d files
(IP forwarding, br_netfilter), the bridges of every network of site.toml (VLAN ones on a tagged subinterface
of the host's ``uplink``) for its ``network_stack``, a libvirt hostdev network ``vf-<pf>`` per SR-IOV
physical function of site.toml (the pool a VM's ``nic=vf:<pf>`` takes a free VF from), a
nested-virtualisation check where ``nested = true``, and the disk and backup directories. Files are pushed
only when they differ, and a setting is applied only when its file changed, or when an earlier run placed the
file and failed (or was interrupted) before applying it (kvmconf.sync marks such files); a VF pool or
NetworkManager bridge found down is started again. Refused, in a dry run too: making an interface that has an
address a bridge port (the host would be cut off it), and creating a directory below an unmounted mount point of
/etc/fstab. ``dry_run`` prints everything; ``network_dry_run`` does all but the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fabric import Connection

from generators.domain_xml import vf_pool_network
from generators.model import Cluster, PhysicalHost
from generators.render import environment, named_by_file, render, xml_banner
from kvmconf.interfaces import parse_addresses
from kvmconf.plan import find_host
from kvmconf.recipes import FileSpec
from kvmconf.remote import SESSION_ERRORS, RemoteError, command, connect, resolve, run, script, session_failure
from kvmconf.sync import Changes, StepFailed, failure, followed_up, install_packages, push

PACKAGES = ("qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-clients")
STACK_PACKAGES = {"ifupdown": ("ifupdown", "bridge-utils", "vlan"), "netplan": ("netplan.io",),
                  "networkmanager": ("network-manager",)}
SYSCTL = "/etc/sysctl.d/90-kvmconf.conf"
MODULES = "/etc/modules-load.d/kvmconf.conf"
BRIDGE_FILES = {"ifupdown": ("/etc/network/interfaces.d/kvmconf-bridges", "kvm-setup-interfaces.j2", "0644"),
                "netplan": ("/etc/netplan/60-kvmconf-bridges.yaml", "kvm-setup-netplan.yaml.j2", "0600")}
VF_NETWORK_DIR = "/etc/kvmconf/libvirt-networks"  # the definitions virsh net-define reads
VF_NETWORK_TEMPLATE = "kvm-setup-vf-network.xml.j2"
VIRSH = ("virsh", "-c", "qemu:///system")
# Args: directories. A line per one that is not there: "missing<TAB>dir", or "unmounted<TAB>mount point<TAB>dir" when
# it lies below a mount point of /etc/fstab that is not mounted (the NAS of the backups, the LV of the disks).
_MISSING_DIRS = r"""for d do
  [ -d "$d" ] && continue
  below=$(findmnt --fstab -n -o TARGET 2>/dev/null | while IFS= read -r m; do
    case "$d/" in "${m%/}"/*) mountpoint -q -- "$m" || printf '%s\n' "$m";; esac
  done | head -n 1)
  if [ -n "$below" ]; then printf 'unmounted\t%s\t%s\n' "$below" "$d"; else printf 'missing\t%s\n' "$d"; fi
done"""
_NESTED = "cat /sys/module/kvm_intel/parameters/nested /sys/module/kvm_amd/parameters/nested 2>/dev/null; true"


@dataclass(frozen=True)
class Bridge:
    networks: tuple[str, ...]  # the networks of site.toml on it: several subnets may share one L2 segment
    name: str
    vlan: int | None
    port: str  # the uplink, its VLAN subinterface, or "" when the host has no uplink in site.toml


@dataclass
class SetupReport:
    host: str
    lines: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)  # network commands run (or, in a dry run, listed)
    files: dict[str, bytes] = field(default_factory=dict)  # the rendered bridge file(s), for checks
    error: str | None = None
    # Called with each line as its step ends: a package install or ifup can take minutes, and the admin sees them.
    progress: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def add(self, line: str) -> None:
        self.lines.append(line)
        if self.progress:
            self.progress(line)


def bridges(cluster: Cluster, host: PhysicalHost) -> list[Bridge]:
    """Every network of site.toml gets its bridge on every host, so any VM can run (or migrate) anywhere.

    Each bridge once, however many networks share it (site.py has checked that they agree on its VLAN), since
    netplan keeps only the last of two equal keys and ifupdown merges two stanzas of one interface into one with
    each option twice. Open vSwitch bridges are left out: they are not Linux bridges, and their admin sets them up
    with ovs-vsctl.
    """
    networks: dict[str, list[str]] = {}
    for name in sorted(cluster.site.networks):
        net = cluster.site.networks[name]
        if not net.ovs:
            networks.setdefault(net.bridge, []).append(name)
    result = []
    for bridge, names in networks.items():
        vlan = cluster.site.networks[names[0]].vlan
        port = (f"{host.uplink}.{vlan}" if vlan else host.uplink) if host.uplink else ""
        result.append(Bridge(tuple(names), bridge, vlan, port))
    return result


def host_files(cluster: Cluster, host: PhysicalHost) -> tuple[list[FileSpec], FileSpec | None]:
    """(system files, the bridge file or None for NetworkManager), rendered from templates/."""
    cluster = named_by_file(cluster)  # else run from hosts/, every file is pushed again, sysctl and ifup redone
    context = {"host": host, "bridges": bridges(cluster, host)}
    system = [FileSpec(SYSCTL, render("kvm-setup-sysctl.conf.j2", cluster, **context).encode(),
                       source="templates/kvm-setup-sysctl.conf.j2"),
              FileSpec(MODULES, render("kvm-setup-modules.conf.j2", cluster, **context).encode(),
                       source="templates/kvm-setup-modules.conf.j2")]
    if host.network_stack not in BRIDGE_FILES:
        return system, None
    dest, template, mode = BRIDGE_FILES[host.network_stack]
    return system, FileSpec(dest, render(template, cluster, **context).encode(), mode=mode,
                            source=f"templates/{template}")


def vf_network_files(cluster: Cluster, host: PhysicalHost) -> list[FileSpec]:
    """One libvirt network definition per SR-IOV physical function of the host, named as the domain XML expects."""
    template = environment().get_template(VF_NETWORK_TEMPLATE)
    banner = xml_banner(named_by_file(cluster), VF_NETWORK_TEMPLATE)
    return [FileSpec(f"{VF_NETWORK_DIR}/{vf_pool_network(pf)}.xml",
                     template.render(banner=banner, name=vf_pool_network(pf), pf=pf).encode(),
                     source=f"templates/{VF_NETWORK_TEMPLATE}")
            for pf in sorted(host.sriov)]


def nmcli_commands(cluster: Cluster, host: PhysicalHost, existing: set[str], active: set[str]) -> list[list[str]]:
    """nmcli argument lists creating the connections not yet in ``existing`` (named kvmconf-<bridge>[-port]), then
    bringing up every bridge when one was created, else the bridges not ``active``.

    Not only after a creation: a run whose `connection up` failed has created them all, and the next one found
    nothing to create and left the bridge down."""
    commands: list[list[str]] = []
    for bridge in bridges(cluster, host):
        con = f"kvmconf-{bridge.name}"
        if con not in existing:
            commands.append(["nmcli", "connection", "add", "type", "bridge", "con-name", con, "ifname", bridge.name,
                             "bridge.stp", "no", "bridge.forward-delay", "0", "ipv4.method", "disabled",
                             "ipv6.method", "ignore"])
        if bridge.port and f"{con}-port" not in existing:
            kind = ["type", "vlan", "dev", host.uplink, "id", str(bridge.vlan)] if bridge.vlan else ["type", "ethernet"]
            commands.append(["nmcli", "connection", "add", *kind, "con-name", f"{con}-port", "ifname", bridge.port,
                             "master", bridge.name, "slave-type", "bridge"])
    return commands + [["nmcli", "connection", "up", f"kvmconf-{b.name}"] for b in bridges(cluster, host)
                       if commands or f"kvmconf-{b.name}" not in active]


def setup(cluster: Cluster, name: str, ssh_config: Path | None, dry_run: bool = False,
          network_dry_run: bool = False, progress: Callable[[str], None] | None = None) -> SetupReport:
    """Prepare host ``name``; ``progress`` is called with each line of the report as soon as its step is done."""
    host = find_host(cluster, name)
    report = SetupReport(name, progress=progress)
    # Not host.ssh_address: the admin's machine reaches the host by the name in its own ssh config (Host kvm1),
    # which a URI's host (kvm1.example.org, the Nagios check's fallback) would bypass; address is for both.
    try:
        conn = connect(resolve(host.address or name, ssh_config), physical_host=True)
    except RemoteError as err:
        if host.address:  # the message names the address: say which host of site.toml has it
            raise RemoteError(f"{name}: {err}") from None
        raise
    with conn:
        try:
            _steps(conn, cluster, host, report, dry_run, network_dry_run or dry_run)
        except StepFailed as err:
            report.error = f"{err.step}: {err}"
        except SESSION_ERRORS as err:  # the report keeps the lines of the steps done, for the admin to see
            report.error = f"ssh: {session_failure(err)}"
    return report


def _steps(conn: Connection, cluster: Cluster, host: PhysicalHost, report: SetupReport, dry_run: bool,
           network_dry_run: bool) -> None:
    packages = PACKAGES + STACK_PACKAGES[host.network_stack]
    state = Changes()
    install_packages(conn, packages, state, dry_run)
    verb = "would install" if dry_run else "installed"
    report.add(f"packages: {verb} {' '.join(state.installed)}" if state.installed else "packages: all present")
    system, bridge_file = host_files(cluster, host)
    changed = set(_push(conn, system, report, dry_run, "settings"))
    settings = []
    if MODULES in changed:
        settings.append(["modprobe", "br_netfilter"])
    if SYSCTL in changed:
        settings.append(["sysctl", "-q", "-p", SYSCTL])
    _apply(conn, settings, report, dry_run, "settings")
    _applied(conn, changed, dry_run)
    _network(conn, cluster, host, bridge_file, report, network_dry_run)
    _vf_networks(conn, cluster, host, report, dry_run)
    if host.nested:
        res = run(conn, _NESTED)
        if not {"Y", "1"} & set(res.stdout.split()):
            raise StepFailed("nested", f"nested virtualisation is off, and [hosts.{host.name}] of {cluster.site.path}"
                                       " says nested = true: set `options kvm_intel nested=1` (or kvm_amd) in a file"
                                       " of /etc/modprobe.d/ and reload the module, or set nested = false")
        report.add("nested: on")
    _directories(conn, cluster, host, report, dry_run)


def _directories(conn: Connection, cluster: Cluster, host: PhysicalHost, report: SetupReport, dry_run: bool) -> None:
    """Create the disk and backup directories that are missing, but none below a mount point that is not mounted:
    made on the filesystem beneath, it would fill that one (often /) with the disks or backups, unseen once the
    mount is back, and the backup's own "does it exist" check, meant to catch an unmounted NAS, would pass."""
    keys = {host.disk_dir: f"disk_dir of [hosts.{host.name}]", cluster.site.backup.dir: "dir of [backup]",
            cluster.site.backup.scratch_dir: "scratch_dir of [backup]"}
    res = run(conn, script(_MISSING_DIRS, *keys))
    if not res.ok:
        raise StepFailed("directories", f"looking for them: {failure(res)}")
    found = [line.split("\t") for line in res.stdout.splitlines()]
    missing_dirs = [fields[1] for fields in found if fields[0] == "missing"]
    if missing_dirs and not dry_run:
        res = run(conn, command("mkdir", "-p", "--", *missing_dirs))
        if not res.ok:
            raise StepFailed("directories", failure(res))
    verb = "would create" if dry_run else "created"
    report.add(f"directories: {verb} {', '.join(missing_dirs)}" if missing_dirs else "directories: present")
    unmounted = [f"{d} ({keys[d]} in {cluster.site.path}) lies below {m}, a mount point of /etc/fstab that is not"
                 " mounted: mount it, then run again" for _, m, d in (f for f in found if f[0] == "unmounted")]
    if unmounted:
        raise StepFailed("directories", "; ".join(unmounted))


def _push(conn: Connection, files: list[FileSpec], report: SetupReport, dry_run: bool, what: str) -> list[str]:
    """Push ``files``; the ones to apply: changed now, or placed by an earlier run that did not get to apply them.

    The caller applies them, then calls :func:`_applied`: until then they stay marked, for the next run."""
    state = Changes()
    push(conn, files, state, dry_run, follow_up=True)
    report.diffs += state.diffs
    verb = "would change" if dry_run else "changed"
    line = f"{what}: {verb}: {', '.join(state.pushed)}" if state.pushed else f"{what}: unchanged"
    if state.resumed:
        line += f"; not applied yet (an earlier run stopped first): {', '.join(state.resumed)}"
    report.add(line)
    return state.pushed + state.resumed


def _applied(conn: Connection, dests: Iterable[str], dry_run: bool) -> None:
    """What :func:`_push` returned has been applied: the next run need not do it again."""
    if not dry_run:
        followed_up(conn, sorted(dests))


def _apply(conn: Connection, commands: list[list[str]], report: SetupReport, dry_run: bool, what: str) -> None:
    for words in commands:
        if dry_run:
            report.add(f"{what}: would run: {command(*words)}")
            continue
        res = run(conn, command(*words))
        if not res.ok:
            raise StepFailed(what, f"{command(*words)}: {failure(res)}")
        report.add(f"{what}: ran: {command(*words)}")


def _network(conn: Connection, cluster: Cluster, host: PhysicalHost, bridge_file: FileSpec | None,
             report: SetupReport, dry_run: bool) -> None:
    what = f"network ({host.network_stack})"
    _refuse_addressed_ports(conn, cluster, host, what)
    if bridge_file is None:  # NetworkManager: connections, not files
        commands = nmcli_commands(cluster, host, _nm_connections(conn), _nm_connections(conn, "--active"))
        report.commands = commands
        if not commands:
            report.add(f"{what}: connections present and up")
        _apply(conn, commands, report, dry_run, what)
        return
    report.files[bridge_file.dest] = bridge_file.content
    to_apply = _push(conn, [bridge_file], report, dry_run, what)
    if not to_apply:
        return
    already_up: list[str] = []
    if host.network_stack == "netplan":
        report.commands = [["netplan", "apply"]]
    else:  # ifupdown: the VLAN subinterfaces before the bridges on them
        all_bridges = bridges(cluster, host)
        names = [b.port for b in all_bridges if b.vlan and b.port] + [b.name for b in all_bridges]
        # Open vSwitch networks alone: nothing to bring up, and ifup refuses an empty list ("no interface(s)
        # specified"), which failed this run and, the file's mark kept, every later one.
        report.commands = [["ifup", "--", *names]] if names else []
        configured = _ifupdown_configured(conn)
        already_up = [name for name in names if name in configured]
    _apply(conn, report.commands, report, dry_run, what)
    if already_up:  # ifup says "already configured" and exits 0: the admin would take the change as applied
        report.add(f"{what}: {', '.join(already_up)} already up, which ifup leaves as they are: what this"
                            " change does to them applies at the next boot, or at `ifdown <name> && ifup <name>`"
                            " (which takes a bridge's VMs off it until they restart)")
    _applied(conn, to_apply, dry_run)


def _ifupdown_configured(conn: Connection) -> set[str]:
    """The interfaces ifupdown has brought up (its state file, /run/network/ifstate); none while it is not installed
    yet, in a dry run."""
    res = run(conn, command("ifquery", "--state"))
    return {line.partition("=")[0] for line in res.stdout.splitlines()} if res.ok else set()


def _nm_connections(conn: Connection, *only: str) -> set[str]:
    """The names of NetworkManager's connections (``--active``: of those up); none while nmcli is not installed yet,
    in a dry run."""
    res = run(conn, command("nmcli", "-g", "NAME", "connection", "show", *only))
    return set(res.stdout.splitlines()) if res.ok else set()


def _refuse_addressed_ports(conn: Connection, cluster: Cluster, host: PhysicalHost, what: str) -> None:
    """Refuse to make an interface with an address (the host's own, often) a bridge port, in a dry run too.

    A port's frames go to its bridge, so its own addresses stop answering: the ifup, netplan apply or nmcli that
    enslaves it cuts the host off them, maybe off the SSH session doing it, and the file placed does the same at the
    next boot. The address has to move to the bridge first, in the host's own configuration."""
    ports = [b for b in bridges(cluster, host) if b.port]
    if not ports:
        return
    res = run(conn, command("ip", "-j", "address", "show"))
    if not res.ok:
        raise StepFailed(what, f"ip -j address show: {failure(res)}")
    addresses = parse_addresses(res.stdout, reachable_only=True)
    for bridge in ports:
        if addresses.get(bridge.port):
            shown = ", ".join(str(a) for a in sorted(addresses[bridge.port], key=lambda a: (a.version, a)))
            raise StepFailed(what, f"{bridge.port} has {shown}: as a port of bridge {bridge.name} (uplink ="
                                   f" {host.uplink!r} of [hosts.{host.name}] in {cluster.site.path}) it would no"
                                   " longer answer there, cutting the host off. Move the address to"
                                   f" {bridge.name} in the host's own network configuration first, or make uplink a"
                                   " NIC without one; the network was left as it is")


def _vf_networks(conn: Connection, cluster: Cluster, host: PhysicalHost, report: SetupReport, dry_run: bool) -> None:
    """Define (and autostart) the VF pool networks libvirt does not have yet, or whose file changed; start the ones
    not running.

    Started whenever inactive, not only when just defined: a run whose net-start failed (the PF had no VFs yet) has
    defined the pool, and the next run would otherwise find it defined and leave it down, VMs unable to start."""
    files = vf_network_files(cluster, host)
    if not files:
        return
    what = "SR-IOV pools"
    changed = set(_push(conn, files, report, dry_run, what))
    defined = _virsh_networks(conn, what, "--all")
    names = [vf_pool_network(pf) for pf in sorted(host.sriov)]  # vf_network_files: one per PF, in this order
    inactive = _virsh_networks(conn, what, "--inactive") if defined & set(names) else set()
    commands: list[list[str]] = []
    for name, spec in zip(names, files, strict=True):
        if name not in defined or spec.dest in changed:  # a redefinition applies when the network restarts
            commands += [[*VIRSH, "net-define", spec.dest], [*VIRSH, "net-autostart", name]]
        if name not in defined or name in inactive:
            commands.append([*VIRSH, "net-start", name])
    if not commands:
        report.add(f"{what}: defined")
    _apply(conn, commands, report, dry_run, what)
    _applied(conn, changed, dry_run)


def _virsh_networks(conn: Connection, what: str, which: str) -> set[str]:
    """The names of libvirt's networks that ``virsh net-list <which>`` lists (--all, --inactive)."""
    res = run(conn, command(*VIRSH, "net-list", which, "--name"))
    if not res.ok:
        raise StepFailed(what, f"virsh net-list {which}: {failure(res)}")
    return set(res.stdout.split())
