"""A throwaway lab on one machine: try provisioning without a server and without touching its network.

``up`` creates a network namespace holding the bridges of site.toml, starts a private virtlogd +
libvirtd per physical host of site.toml *inside* it (so the taps libvirt makes for
``<interface type='bridge'>``, and the QEMU processes, are in the namespace too) and the
generated dnsmasq serving the provision network's bridge. The daemons get their own /run,
/etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind mounts in a mount
namespace of their own, which ``ip netns exec`` creates), so they never meet the machine's own
libvirt nor each other; each is reached through its own socket below the lab directory. ``down``
stops exactly the processes ``up`` started, by PID, then anything still in the namespace (QEMUs),
and removes the namespace and the lab's files.

The first host (by name) keeps its daemons' state in the lab directory itself, every other host
in ``hosts/<name>/`` below it: separate machines on one network (they share the namespace's
bridges). Tasks see the lab through :func:`remap`: every physical host of site.toml becomes its
own lab daemon, disks go to the lab directory, and the domain type is ``qemu`` (software emulation)
unless the lab was started with ``kvm=True``: nested KVM often cannot run guests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import libvirt

from generators.files import replace_text
from generators.model import Cluster, DomainType, Network
from generators.render import environment
from kvmconf.errors import KvmconfError
from kvmconf.processes import alive, in_netns, output_of, stop_pid
from kvmconf.provision_server import serve_lab

Log = Callable[[str], None]

DEFAULT_DIR = Path("/var/tmp/kvmconf-lab")
DEFAULT_NETNS = "kvmconf-lab"
STATE_FILE = "lab.json"
_DAEMONS = ("reaper", "virtlogd", "libvirtd")  # started in this order by reaper.py and _LAUNCH
# Made first in a lab directory: it says the directory is a lab's own, so that up may use it again.
MARKER_FILE = ".kvmconf-lab"
# What a lab makes: _HOST_ENTRIES in the directory of each host's daemon (the lab directory for the first,
# hosts/<name>/ for the others), _LAB_ENTRIES in the lab directory. Teardown removes these and nothing else,
# so a directory named by mistake (--dir ., ~) keeps the rest; and it keeps base/ (_KEPT), where the admin
# may have put a real cloud image.
_HOST_ENTRIES = ("libvirt", "sock", "launch.log", "libvirtd.log", "virtlogd.log",
                 *(f"{daemon}.pid" for daemon in _DAEMONS))
_LAB_ENTRIES = (STATE_FILE, "images", "kvmconf", "tftp", "dnsmasq.pid", "dnsmasq.leases", "dnsmasq.log",
                "http.pid", "http-server.log", "backups", "backups-nas", "backup.log", *_HOST_ENTRIES)
_KEPT = "base"
# What `ip netns add` takes (no "/", not "." or "..", at most NAME_MAX), less whitespace and a leading "-" or
# ".": `ip netns list` is read by splitting on blanks, and a name is passed as an argument to ip.
_NETNS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
BASE_IMAGE_GB = 1  # placeholder cloud image; drop a real one at base/<os>.qcow2 to boot it
TOOLS = ("ip", "libvirtd", "virtlogd", "qemu-img", "qemu-system-x86_64", "dnsmasq")
_START_TIMEOUT = 60.0  # libvirtd's first start probes QEMU's capabilities: seconds under emulation

# Runs inside `ip netns exec`, i.e. in the namespace and in a fresh mount namespace whose mounts
# do not propagate back (ip makes / a slave). $1 is the lab directory.
_LAUNCH = """set -eu
d=$1
mount -t tmpfs -o mode=0755 kvmconf-lab /run
mkdir -p /run/libvirt /run/lock
for pair in etc:/etc/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mkdir -p "${pair#*:}"
  mount --bind "$d/libvirt/${pair%%:*}" "${pair#*:}"
done
virtlogd -d -f /etc/libvirt/virtlogd.conf -p "$d/virtlogd.pid"
libvirtd -d -f /etc/libvirt/libvirtd.conf -p "$d/libvirtd.pid"
"""


@dataclass
class Lab:
    dir: Path
    netns: str
    kvm: bool = False
    pids: dict[str, int] = field(default_factory=dict)  # what up() started: reaper, virtlogd, libvirtd, dnsmasq
    bridges: dict[str, str] = field(default_factory=dict)  # bridge -> its address/prefix in the namespace ("" for none)
    # Physical hosts with a daemon of their own, sorted; the first one's lives in `dir` itself and its
    # processes keep the plain names (libvirtd, ...), the others' are <name>@<host> in hosts/<host>/.
    hosts: list[str] = field(default_factory=list)

    def host_dir(self, host: str | None = None) -> Path:
        """Where a host's daemon keeps its state, socket, pid files and logs."""
        if host is None or not self.hosts or host == self.hosts[0] or host not in self.hosts:
            return self.dir
        return self.dir / "hosts" / host

    def pid_key(self, name: str, host: str | None) -> str:
        return name if self.host_dir(host) == self.dir else f"{name}@{host}"

    def socket_of(self, host: str | None) -> Path:
        return self.host_dir(host) / "sock" / "libvirt-sock"

    def uri_of(self, host: str | None) -> str:
        """The libvirt URI of ``host``'s daemon (the first daemon's for a host the lab does not know)."""
        return f"qemu+unix:///system?socket={self.socket_of(host)}"

    @property
    def uri(self) -> str:
        """The first host's daemon."""
        return self.uri_of(None)

    @property
    def daemons(self) -> list[str | None]:
        """One entry per libvirtd: the host it stands for (None for a lab from before one daemon per host)."""
        return list(self.hosts) or [None]

    @property
    def images(self) -> Path:
        return self.dir / "images"

    @property
    def base(self) -> Path:
        return self.dir / "base"

    def save(self) -> None:
        data = {"dir": str(self.dir), "netns": self.netns, "kvm": self.kvm, "pids": self.pids, "bridges": self.bridges,
                "hosts": self.hosts}
        replace_text(self.dir / STATE_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, lab_dir: Path) -> Lab | None:
        try:
            data = json.loads((lab_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        return cls(Path(data["dir"]), data["netns"], data["kvm"], data["pids"], data["bridges"], data.get("hosts", []))


# --- the lab as the tasks see it ----------------------------------------------------------------

def provision_network(cluster: Cluster) -> Network | None:
    """The network the provision server (our dnsmasq in the lab) is on."""
    server = cluster.site.provision.server
    return next((net for net in cluster.site.networks.values() if server and server in net.subnet), None)


def remap(cluster: Cluster, lab: Lab, images: Path | None = None) -> Cluster:
    """The cluster as it runs in the lab: every host is its lab libvirtd, files live in the lab directory."""
    site = cluster.site
    images = images or lab.images
    hosts = {name: dataclasses.replace(h, uri=lab.uri_of(name), disk_dir=str(images / name))
             for name, h in site.hosts.items()}
    oses = {name: dataclasses.replace(o, cloud_image=str(lab.base / f"{name}.qcow2") if o.cloud_image else None)
            for name, o in site.oses.items()}
    net = provision_network(cluster)
    provision = dataclasses.replace(site.provision, config_dir=str(lab.dir / "kvmconf"),
                                    tftp_root=str(lab.dir / "tftp"),
                                    interface=net.bridge if net else site.provision.interface)
    # The lab's VMs may bear the names of real ones: their backups must never join (or prune) the real chains.
    backup = dataclasses.replace(site.backup, dir=str(lab.dir / "backups"), log=str(lab.dir / "backup.log"),
                                 nas_dir=str(lab.dir / "backups-nas") if site.backup.nas_dir else None)
    site = dataclasses.replace(site, hosts=hosts, oses=oses, provision=provision, backup=backup,
                               domain_type=DomainType.KVM if lab.kvm else DomainType.QEMU)
    return dataclasses.replace(cluster, site=site)


def bridge_addresses(cluster: Cluster) -> dict[str, str]:
    """Each network's bridge with the address it gets in the namespace: the provision server's, else the gateway's."""
    server = cluster.site.provision.server
    bridges = {}
    for net in sorted(cluster.site.networks.values(), key=lambda n: n.name):
        address: IPv4Address | None = server if server and server in net.subnet else net.gateway
        bridges[net.bridge] = str(IPv4Interface(f"{address}/{net.subnet.prefixlen}")) if address else ""
    return bridges


# --- processes ------------------------------------------------------------------------------------

def _run(argv: Sequence[str]) -> str:
    return output_of(argv, context="lab: ")


def netns_exists(netns: str) -> bool:
    return Path("/run/netns", netns).exists()


def netns_pids(netns: str) -> list[int]:
    if not netns_exists(netns):
        return []
    return [int(pid) for pid in _run(["ip", "netns", "pids", netns]).split()]


def _read_pid(path: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise KvmconfError(f"lab: {path} did not appear: the daemon did not start (see the logs in {path.parent})")


def check_requirements() -> None:
    if os.geteuid() != 0:
        raise KvmconfError("the lab needs root: it creates a network namespace and runs libvirtd")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [tool for tool in TOOLS if shutil.which(tool, path=path) is None]
    if missing:
        raise KvmconfError(f"the lab needs {', '.join(missing)}: install them with `make test-deps`"
                           " (packages libvirt-daemon-system, qemu-system-x86, qemu-utils, dnsmasq-base, iproute2)")


# --- up and down ----------------------------------------------------------------------------------

def check_netns_name(netns: str) -> None:
    if not _NETNS_NAME.fullmatch(netns):
        raise KvmconfError(f"network namespace name {netns!r}: use letters, digits, '_', '.' and '-' (not first),"
                           f" at most 255 characters (`ip netns` refuses '/', '.' and '..'), e.g. {DEFAULT_NETNS}")


def is_lab_dir(lab_dir: Path) -> bool:
    """Whether ``lab_dir`` may hold a lab: missing, empty, marked as a lab's, or left by a lab (base/, lab.json)."""
    if not lab_dir.exists():
        return True
    if not lab_dir.is_dir():
        return False
    entries = {entry.name for entry in lab_dir.iterdir()}
    # lab.json without the marker: a lab started before there was a marker.
    return MARKER_FILE in entries or STATE_FILE in entries or entries <= {_KEPT}


def check_lab_dir(lab_dir: Path) -> None:
    """Refuse a directory that is no lab's: a failed up, and down, remove what a lab makes in it."""
    if is_lab_dir(lab_dir):
        return
    if lab_dir.is_dir():
        names = sorted(entry.name for entry in lab_dir.iterdir())
        what = f"holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} and no {MARKER_FILE} (it is no lab's)"
    else:
        what = "is not a directory"
    raise KvmconfError(f"lab directory {lab_dir} {what}: a lab starts only in a new or empty directory, or one a"
                       f" lab made; give --dir (or KVMCONF_LAB) another one (default {DEFAULT_DIR})")


def up(cluster: Cluster, lab_dir: Path = DEFAULT_DIR, netns: str | None = None, kvm: bool = False,
       log: Log = print) -> Lab:
    """Start the lab (or refresh the dnsmasq files of a running one); undo everything if a step fails.

    ``netns`` None: :data:`DEFAULT_NETNS` for a new lab, the running lab's own for a refresh. A running lab keeps
    its namespace and domain type: another ``netns``, or ``kvm`` for a qemu lab, is refused, not ignored.
    Only in a directory :func:`is_lab_dir` accepts, and what a failure undoes is what a lab makes there.
    """
    check_requirements()
    lab_dir = lab_dir.absolute()
    if netns is not None:
        check_netns_name(netns)
    check_lab_dir(lab_dir)
    existing = Lab.load(lab_dir)
    if existing is not None and alive(existing.pids.get("libvirtd", 0)):
        check_same_lab(existing, netns, kvm)
        _serve_provision(remap(cluster, existing), existing, log)
        log(f"lab already up in {lab_dir} (namespace {existing.netns}); dnsmasq files refreshed")
        return existing
    if existing is not None:
        log(f"lab: removing the remains of a lab that is no longer running in {lab_dir}")
        teardown(existing, log)
    netns = netns or DEFAULT_NETNS
    if netns_exists(netns):
        raise KvmconfError(f"network namespace {netns} exists already and is not this lab's"
                           f" (see `ip netns pids {netns}`; remove it with `ip netns del {netns}` if it is a leftover)")
    lab = Lab(lab_dir, netns, kvm, bridges=bridge_addresses(cluster), hosts=sorted(cluster.site.hosts))
    try:
        _make_files(lab, cluster)
        _make_netns(lab)
        _start_libvirt(lab)
        wait_for_libvirt(lab)
        _serve_provision(remap(cluster, lab), lab, log)
    except BaseException:
        teardown(lab, log)
        raise
    daemons = "; ".join(f"{host or 'libvirtd'}: libvirtd {lab.pids[lab.pid_key('libvirtd', host)]}, virtlogd"
                        f" {lab.pids[lab.pid_key('virtlogd', host)]}" for host in lab.daemons)
    log(f"lab up: namespace {netns} with {', '.join(lab.bridges)}; {daemons}"
        + (f"; dnsmasq {lab.pids['dnsmasq']}" if "dnsmasq" in lab.pids else "")
        + f"; domain type {'kvm' if kvm else 'qemu'}")
    for host in lab.daemons:
        log(f"libvirt{f' of {host}' if host else ''}: virsh -c '{lab.uri_of(host)}' list --all")
    return lab


def check_same_lab(running: Lab, netns: str | None, kvm: bool) -> None:
    """Refuse what ``up`` asks of a running lab that it is not: it cannot change namespace or domain type running.

    No ``kvm`` asks for nothing (the task has no --no-kvm), so a kvm lab is refreshed as it is.
    """
    if netns not in (None, running.netns):
        asked = f"--netns {netns}"
    elif kvm and not running.kvm:
        asked = "--kvm"
    else:
        return
    raise KvmconfError(f"a lab is up in {running.dir} already, in namespace {running.netns} with domain type"
                       f" {'kvm' if running.kvm else 'qemu'}: {asked} needs a new lab; stop this one with `invoke"
                       f" lab.down --dir {running.dir}` first, or start another with --dir")


def _serve_provision(cluster: Cluster, lab: Lab, log: Log) -> None:
    """The provision server in the namespace (kvmconf.provision_server): the build, the TFTP tree, dnsmasq
    (deployed as on a real server: a changed config passes `dnsmasq --test` first) and HTTP."""
    serve_lab(cluster, lab, log)


def _make_files(lab: Lab, cluster: Cluster) -> None:
    lab.dir.mkdir(parents=True, exist_ok=True)
    (lab.dir / MARKER_FILE).write_text("A kvmconf lab's directory: `invoke lab.down` removes what the lab made here.\n")
    for sub in ("base", "kvmconf", "tftp", "backups"):  # backups: the [backup] dir, as kvm-setup makes it
        (lab.dir / sub).mkdir(parents=True, exist_ok=True)
    for name in cluster.site.hosts:
        (lab.images / name).mkdir(parents=True, exist_ok=True)
    lab.save()
    for host in lab.daemons:
        home = lab.host_dir(host)
        for sub in ("libvirt/etc", "libvirt/lib", "libvirt/cache", "libvirt/log", "sock"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        context = {"banner": f"Generated by kvmconf for the lab in {lab.dir}; removed by `invoke lab.down`.",
                   "netns": lab.netns, "socket_dir": str(lab.socket_of(host).parent)}
        for name, log_name in (("libvirtd", "libvirtd.log"), ("qemu", ""), ("virtlogd", "virtlogd.log")):
            text = environment().get_template(f"lab-{name}.conf.j2").render(**context, log_file=str(home / log_name))
            (home / "libvirt" / "etc" / f"{name}.conf").write_text(text)
    for os_name, release in cluster.site.oses.items():
        image = lab.base / f"{os_name}.qcow2"
        if release.cloud_image and not image.exists():
            _run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{BASE_IMAGE_GB}G"])


def _make_netns(lab: Lab) -> None:
    _run(["ip", "netns", "add", lab.netns])
    lab.save()  # from here on, teardown removes the namespace
    ns = ["ip", "netns", "exec", lab.netns]
    _run([*ns, "ip", "link", "set", "lo", "up"])
    for bridge, address in lab.bridges.items():
        _run([*ns, "ip", "link", "add", bridge, "type", "bridge"])
        if address:
            _run([*ns, "ip", "address", "add", address, "dev", bridge])
        _run([*ns, "ip", "link", "set", bridge, "up"])


def _start_libvirt(lab: Lab) -> None:
    """One reaper + virtlogd + libvirtd per host, each in its own mount namespace with its own state."""
    reaper = Path(__file__).with_name("reaper.py")
    for host in lab.daemons:
        home = lab.host_dir(host)
        for name in _DAEMONS:
            (home / f"{name}.pid").unlink(missing_ok=True)
        _run(["ip", "netns", "exec", lab.netns, sys.executable, str(reaper), str(home), _LAUNCH])
        for name in _DAEMONS:
            lab.pids[lab.pid_key(name, host)] = _read_pid(home / f"{name}.pid")
            lab.save()


def wait_for_libvirt(lab: Lab, timeout: float = _START_TIMEOUT) -> None:
    """Wait for every daemon; they start together, so their QEMU capability probes overlap."""
    deadline = time.monotonic() + timeout
    for host in lab.daemons:
        uri = lab.uri_of(host)
        while True:
            try:
                conn = libvirt.open(uri)
                try:
                    conn.getCapabilities()  # the first call waits for the QEMU driver's capability probe
                finally:
                    conn.close()
                break
            except libvirt.libvirtError as err:
                if time.monotonic() > deadline or not alive(lab.pids.get(lab.pid_key("libvirtd", host), 0)):
                    raise KvmconfError(f"lab: libvirtd does not answer at {uri} ({err.get_error_message()});"
                                       f" see {lab.host_dir(host) / 'libvirtd.log'}") from None
                time.sleep(0.2)


def down(lab_dir: Path = DEFAULT_DIR, log: Log = print) -> bool:
    """Stop the lab in ``lab_dir``; False when there was none."""
    lab = Lab.load(lab_dir.absolute())
    if lab is None:
        return False
    teardown(lab, log)
    return True


def teardown(lab: Lab, log: Log = print) -> None:
    """Stop what the lab started and remove it; safe on a half-started or already dead lab."""
    for host in lab.daemons:
        if alive(lab.pids.get(lab.pid_key("libvirtd", host), 0)):
            _power_off_all(lab, host)
    # The reaper exits by itself after the others; other keys are the provision server's, stopped first.
    ours = [lab.pid_key(name, host) for host in lab.daemons for name in ("libvirtd", "virtlogd", "reaper")]
    for name in [*(key for key in lab.pids if key not in ours), *ours]:
        pid = lab.pids.get(name)
        if pid and alive(pid) and in_netns(pid, lab.netns):
            stop_pid(pid)
            log(f"lab: stopped {name} ({pid})")
    # Whatever else is still in the namespace was started by its libvirtd (QEMU): nothing else can be there.
    for pid in netns_pids(lab.netns):
        stop_pid(pid, timeout=5)
        log(f"lab: stopped process {pid} left in the namespace")
    if netns_exists(lab.netns):
        _run(["ip", "netns", "del", lab.netns])
        log(f"lab: removed network namespace {lab.netns}")
    for host in lab.daemons:
        if lab.host_dir(host) != lab.dir:
            _remove_entries(lab.host_dir(host), _HOST_ENTRIES)
            with suppress(OSError):  # not empty: something the lab did not make is there, and stays
                lab.host_dir(host).rmdir()
    with suppress(OSError):
        (lab.dir / "hosts").rmdir()
    _remove_entries(lab.dir, (*_LAB_ENTRIES, MARKER_FILE))


def _remove_entries(directory: Path, names: Sequence[str]) -> None:
    """Remove the entries of ``directory`` that a lab makes, and only those (see _LAB_ENTRIES)."""
    for name in names:
        entry = directory / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _power_off_all(lab: Lab, host: str | None) -> None:
    try:
        conn = libvirt.open(lab.uri_of(host))
    except libvirt.libvirtError:
        return
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with suppress(libvirt.libvirtError):  # stopped meanwhile; anything left is killed by PID below
                dom.destroy()
    finally:
        conn.close()


def remove_stale_netns(prefix: str) -> list[str]:
    """Namespaces ``<prefix><pid>[-<anything>]`` whose creating process ``pid`` is dead: a killed run's labs."""
    removed = []
    for line in _run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.strip() else ""
        owner = name.removeprefix(prefix).split("-")[0]
        if name.startswith(prefix) and owner.isdigit() and not alive(int(owner)):
            for pid in netns_pids(name):
                stop_pid(pid, timeout=5)
            _run(["ip", "netns", "del", name])
            removed.append(name)
    return removed
