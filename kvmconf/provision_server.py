"""The provision server: dnsmasq (DHCP/DNS/TFTP) with the generated config, the TFTP tree, and HTTP for installers.

Layout under ``[provision] config_dir`` (default /etc/kvmconf) on the provision server:

  build/            the generated files as built (dnsmasq/, preseed/, cloud-init/, tftp/): the server's copy
  dnsmasq/          what dnsmasq reads (build/dnsmasq, checked before it replaces the running config)
  installed         the VMs whose network install is done, one name a line: the state a rebuild must keep
  http.log          one line per HTTP request (client, path, status)

A VM's install is marked done by its installer's late_command fetching ``<http_url>/installed/<vm>``:
the server removes that VM's per-MAC boot entries from the TFTP root, so its next PXE boot reads
the defaults (pxelinux: LOCALBOOT; GRUB: exit to the next boot device, the disk).
``invoke reinstall --vm`` puts them back. Because every deploy assembles the TFTP root from build/
*and* ``installed``, a later `make` + deploy never turns an installed VM back into one that reinstalls;
and per-MAC entries the build no longer has (a VM removed, a MAC changed) are deleted.
The mark never touches dnsmasq: its hostsfile lines carry no tags, because dnsmasq 2.90 crashed
(segfault) on SIGHUP after it had answered a VM whose hostsfile line set one (``set:install``).

Checked before anything changes: a deploy renders everything in memory, checks that this machine has every
file the TFTP root copies (pxelinux, GRUB, the netboot installers) and runs ``dnsmasq --test`` on the new
main conf together with every hostsfile line (which --test alone never reads). Only then does it write
build/, the TFTP root and config_dir/dnsmasq: a failed check leaves all of them, and the running daemon, as
they were.

Reloading: a deploy that changes only the hostsfiles or the hosts file sends SIGHUP (dnsmasq re-reads
those, same PID); a changed main conf restarts dnsmasq. A new dnsmasq that does not start (its interface
or port taken) gets the previous files back and their dnsmasq restarted, and the deploy fails saying so.
"Running" means a live dnsmasq whose command line names our pid file: the pid file survives a reboot, and
the PID in it may by then be an unrelated process, which is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from generators import pxe
from generators.build import input_digest, render_all
from generators.files import exclusively, replace_text
from generators.model import Cluster, Install
from generators.pxe import BIOS_LOADER_FILES
from generators.site_values import parse_http_url
from generators.writer import write_tree
from kvmconf.errors import KvmconfError
from kvmconf.interfaces import interface_addresses
from kvmconf.lab import Lab, start_dnsmasq
from kvmconf.plan import find_vm
from kvmconf.processes import alive, command_line, in_netns, output_of, stop_pid

Log = Callable[[str], None]

CHECKOUT = Path(__file__).resolve().parent.parent  # the kvmconf checkout this runs from: `-m kvmconf...` needs it
STATE_FILE = "installed"
STATE_LOCK = ".installed.lock"  # held while the installed state or the TFTP entries made from it change
HTTP_LOG = "http.log"
HTTP_PID_KEY = "provision-http"  # the HTTP server's entry in the lab's pids
SERVED = ("preseed", "cloud-init")  # build/ directories served over HTTP at <http_url>/<dir>/...
# The Debian netboot package per suite: debian-installer-<N>-netboot-amd64 puts its tree here.
NETBOOT_RELEASES = {"bullseye": 11, "bookworm": 12, "trixie": 13}
NETBOOT_DIR = "/usr/lib/debian-installer/images/{release}/amd64/text"
GRUB_EFI_MODULES = Path("/usr/lib/grub") / pxe.GRUB_PLATFORM


def build_dir_in(config_dir: Path) -> Path:
    """config_dir/build: the server's copy of the generated files, which everything it serves comes from."""
    return config_dir / "build"


# --- installed state --------------------------------------------------------------------------------

def read_installed(config_dir: Path) -> set[str]:
    try:
        text = (config_dir / STATE_FILE).read_text()
    except FileNotFoundError:
        return set()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def _state_locked(config_dir: Path) -> contextlib.AbstractContextManager[None]:
    """An install mark and the assembly of the TFTP root take turns.

    A deploy reads the state, then copies the built tree leaving out installed VMs' entries. A mark
    landing in between (its installer finishing) would remove the VM's entry and then see the deploy
    copy it back: the installed VM would reinstall itself at its next network boot.
    """
    config_dir.mkdir(parents=True, exist_ok=True)
    return exclusively(config_dir / STATE_LOCK)


def write_installed(config_dir: Path, names: Iterable[str]) -> None:
    body = "".join(f"{name}\n" for name in sorted(set(names)))
    replace_text(config_dir / STATE_FILE, "# VMs whose network install is done (kvmconf provision server)\n" + body)


def boot_entries(config_dir: Path, vm: str) -> list[str]:
    """The VM's per-MAC boot configs, relative to the TFTP root (its MAC from its hostsfile line in build/)."""
    try:
        text = (build_dir_in(config_dir) / "dnsmasq" / "dhcp-hosts" / vm).read_text()
    except FileNotFoundError:
        return []
    mac = next(line for line in text.splitlines() if line.strip() and not line.startswith("#")).split(",")[0]
    return pxe.boot_entries(mac)


# --- dnsmasq -----------------------------------------------------------------------------------------

@dataclass
class Dnsmasq:
    """The running dnsmasq: found through its pid file, (re)started with ``start(conf)``.

    Only a live dnsmasq whose command line names this pid file counts as running. The file outlives its process
    (config_dir survives a reboot), and the PID it names may by now be any other process's: signalling that one
    would SIGHUP, or SIGTERM then SIGKILL, an unrelated program.
    """

    pid_file: Path
    start: Callable[[Path], None]

    def _recorded_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid) else None  # a zombie is not serving

    def _is_ours(self, pid: int) -> bool:
        argv = command_line(pid)
        return bool(argv) and Path(argv[0]).name == "dnsmasq" and f"--pid-file={self.pid_file}" in argv

    def pid(self) -> int | None:
        pid = self._recorded_pid()
        return pid if pid is not None and self._is_ours(pid) else None

    def stranger(self) -> str | None:
        """What the pid file wrongly names, when that is a live process other than this dnsmasq: None otherwise."""
        pid = self._recorded_pid()
        if pid is None or self._is_ours(pid):
            return None
        return f"{self.pid_file} names PID {pid}, which is not this dnsmasq ({shlex.join(command_line(pid))!r})"

    def reload(self) -> None:
        """SIGHUP: re-read the hostsfiles and the hosts file (nothing to do when it is not running)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    def restart(self, conf: Path) -> None:
        pid = self.pid()
        if pid is not None:
            stop_pid(pid)  # SIGKILL after the grace time: a stuck old dnsmasq would keep the ports
        self.start(conf)


def system_dnsmasq(config_dir: Path) -> Dnsmasq:
    """dnsmasq on a real provision server, run by kvmconf with the deployed config (not /etc/dnsmasq.conf)."""
    pid_file = config_dir / "dnsmasq.pid"

    def start(conf: Path) -> None:
        output_of(["dnsmasq", f"--conf-file={conf}", f"--pid-file={pid_file}"])

    return Dnsmasq(pid_file, start)


def check_dnsmasq(conf_text: str, hostsfile_lines: Iterable[str]) -> None:
    """``dnsmasq --test`` on the main conf plus every hostsfile line as a dhcp-host= option (--test skips files).

    The scratch file goes to a temporary directory: the check runs before anything of config_dir is written.
    """
    with tempfile.TemporaryDirectory(prefix="kvmconf-dnsmasq-check-") as scratch:
        check = Path(scratch) / "dnsmasq-check.conf"
        check.write_text(conf_text + "\n" + "".join(f"dhcp-host={line}\n" for line in hostsfile_lines))
        result = subprocess.run(["dnsmasq", "--test", f"--conf-file={check}"], capture_output=True, text=True,
                                timeout=60, check=False)
    if result.returncode != 0:
        raise KvmconfError("dnsmasq --test rejected the new configuration; the running one stays:"
                           f" {(result.stderr or result.stdout).strip()}")


def _entries(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file()}


def _config_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class DnsmasqFiles:
    """What dnsmasq reads: the main conf, the hostsfiles (one per VM) and the hosts file."""

    conf: str
    hosts: dict[str, str]
    addn: str | None  # None: no hosts file (a deploy from before it was generated)

    @classmethod
    def read(cls, directory: Path) -> DnsmasqFiles | None:
        """The files in ``directory`` (config_dir/dnsmasq or build/dnsmasq); None before a first deploy."""
        if not (directory / "dnsmasq.conf").exists():
            return None
        addn = (directory / "hosts").read_text() if (directory / "hosts").exists() else None
        return cls((directory / "dnsmasq.conf").read_text(), _entries(directory / "dhcp-hosts"), addn)

    @classmethod
    def rendered(cls, files: Mapping[PurePosixPath, str | bytes]) -> DnsmasqFiles:
        """The files as render_all made them, before any is written."""
        def text(path: PurePosixPath) -> str:
            content = files[path]
            return content if isinstance(content, str) else content.decode()

        root = PurePosixPath("dnsmasq")
        hosts = {path.name: text(path) for path in sorted(files) if path.parent == root / "dhcp-hosts"}
        return cls(text(root / "dnsmasq.conf"), hosts, text(root / "hosts"))

    def check(self) -> None:
        # Every hostsfile line too, also when only hostsfiles changed: at runtime dnsmasq skips a bad line silently.
        check_dnsmasq(self.conf, [line for text in self.hosts.values() for line in _config_lines(text)])

    def write_over(self, live: Path, old: DnsmasqFiles | None) -> None:
        """Make ``live`` hold these files, rewriting only those that differ from ``old`` (what it holds now)."""
        old_hosts = old.hosts if old else {}
        (live / "dhcp-hosts").mkdir(parents=True, exist_ok=True)
        for name, text in self.hosts.items():
            if old_hosts.get(name) != text:
                replace_text(live / "dhcp-hosts" / name, text)
        for name in old_hosts.keys() - self.hosts.keys():
            (live / "dhcp-hosts" / name).unlink()
        if self.addn is not None and (old is None or old.addn != self.addn):
            replace_text(live / "hosts", self.addn)
        if old is None or old.conf != self.conf:
            replace_text(live / "dnsmasq.conf", self.conf)


def deploy_dnsmasq(config_dir: Path, dnsmasq: Dnsmasq, log: Log = print) -> str:
    """Make config_dir/dnsmasq from config_dir/build/dnsmasq and the installed state; reload or restart.

    Returns what happened: "unchanged", "reloaded" (SIGHUP), "restarted" or "started". A restart whose new
    dnsmasq does not start brings the previous files and their dnsmasq back and raises: DHCP keeps running.
    """
    live = config_dir / "dnsmasq"
    new = DnsmasqFiles.read(build_dir_in(config_dir) / "dnsmasq")
    if new is None:
        raise KvmconfError(f"{build_dir_in(config_dir) / 'dnsmasq' / 'dnsmasq.conf'} is missing: nothing to deploy")
    new.check()
    old = DnsmasqFiles.read(live)
    if (stranger := dnsmasq.stranger()) is not None:
        log(f"provision server: {stranger}: left alone; no dnsmasq of ours runs")
    running = dnsmasq.pid() is not None
    new.write_over(live, old)
    if old is not None and old.conf == new.conf and running:
        what = "reloaded" if old != new else "unchanged"
        if old != new:
            dnsmasq.reload()
    else:
        _restart(dnsmasq, live, new, old if running else None)
        what = "restarted" if running else "started"
    log(f"provision server: dnsmasq {what}")
    return what


def _restart(dnsmasq: Dnsmasq, live: Path, new: DnsmasqFiles, previous: DnsmasqFiles | None) -> None:
    """(Re)start dnsmasq on ``new``; if it does not start, bring back ``previous`` (what was running) and raise."""
    try:
        dnsmasq.restart(live / "dnsmasq.conf")
    except KvmconfError as failed:
        why = f"dnsmasq did not start with the new configuration: {failed}"
        if previous is None:
            raise KvmconfError(f"{why}; no dnsmasq of ours was running before, so none runs now") from failed
        previous.write_over(live, new)
        try:
            dnsmasq.restart(live / "dnsmasq.conf")
        except KvmconfError as again:
            raise KvmconfError(f"{why}; the previous configuration, put back, did not start either: {again};"
                               " no dnsmasq of ours runs now") from failed
        raise KvmconfError(f"{why}; the previous configuration is back and its dnsmasq runs again"
                           f" (pid {dnsmasq.pid()})") from failed


def set_installed(config_dir: Path, tftp_root: Path, vm: str, done: bool) -> bool:
    """Mark a VM's install done (remove its boot entries) or to be redone (restore them). False: no such VM."""
    if not vm or "/" in vm or vm.startswith("."):
        return False
    entries = boot_entries(config_dir, vm)
    if not entries:
        return False
    with _state_locked(config_dir):
        installed = read_installed(config_dir)
        write_installed(config_dir, installed | {vm} if done else installed - {vm})
        for rel in entries:
            built = build_dir_in(config_dir) / pxe.BUILD_DIR / rel
            if done:
                (tftp_root / rel).unlink(missing_ok=True)
            elif built.is_file():
                _copy_if_changed(built, tftp_root / rel)
    return True


# --- TFTP tree -----------------------------------------------------------------------------------------

def netboot_dir(suite: str) -> Path:
    release = NETBOOT_RELEASES.get(suite)
    if release is None:
        raise KvmconfError(f"no Debian netboot images known for suite {suite!r} (known: {', '.join(NETBOOT_RELEASES)})")
    path = Path(NETBOOT_DIR.format(release=release))
    if not path.is_dir():
        raise KvmconfError(f"{path} is missing: install the package debian-installer-{release}-netboot-amd64")
    return path


def tftp_sources(cluster: Cluster, tftp_root: Path) -> dict[str, Path]:
    """The files the TFTP root needs from this machine's packages (its path there -> the file): pxelinux and each
    OS's installer kernel and initrd. Every one missing, and GRUB's EFI modules when the root has no GRUB image
    yet, is one KvmconfError before anything is written: a deploy never stops halfway for a package."""
    sources = {name: Path(src) for name, src in BIOS_LOADER_FILES.items()}
    problems: list[str] = []
    for release in cluster.site.oses.values():
        if release.family != "debian" or not release.kernel or not release.initrd:
            continue
        try:
            netboot = netboot_dir(release.suite)
        except KvmconfError as missing:
            problems.append(str(missing))
            continue
        sources.update({rel.lstrip("/"): netboot / rel.lstrip("/") for rel in (release.kernel, release.initrd)})
    problems += [f"{src} is missing (needed in the TFTP root as {Path(rel).name})" for rel, src in sources.items()
                 if not src.is_file()]
    if not (tftp_root / pxe.GRUB_CORE_EFI).exists():
        if not GRUB_EFI_MODULES.is_dir():
            problems.append(f"{GRUB_EFI_MODULES} is missing: install the package grub-efi-amd64-bin")
        if shutil.which("grub-mknetdir") is None:
            problems.append("grub-mknetdir is missing: install the package grub-common")
    if problems:
        raise KvmconfError("the TFTP root cannot be assembled; nothing was changed: " + "; ".join(problems))
    return sources


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise KvmconfError(f"{src} is missing (needed in the TFTP root as {dst.name})")
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary: a deploy and an install mark (or two deploys) may copy the same file at once.
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".new", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)  # with src's mtime, which the next deploy compares
        os.chmod(tmp, 0o644)  # TFTP serves world-readable files only
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def assemble_tftp(cluster: Cluster, build: Path, tftp_root: Path) -> None:
    """The TFTP root: the generated boot configs (none for installed VMs), pxelinux, a GRUB EFI image with
    prefix /grub, each OS's installer kernel and initrd."""
    sources = tftp_sources(cluster, tftp_root)  # before the first change
    tftp_root.mkdir(parents=True, exist_ok=True)
    with _state_locked(build.parent):
        _copy_boot_entries(build, tftp_root)
    if not (tftp_root / pxe.GRUB_CORE_EFI).exists():
        # Debian's netboot grubx64.efi has /debian-installer/amd64/grub built in as its prefix: it would never
        # read grub/grub.cfg. grub-mknetdir makes an image whose prefix is the TFTP directory grub/.
        output_of(["grub-mknetdir", f"-d{GRUB_EFI_MODULES}", f"--net-directory={tftp_root}",
                   f"--subdir={pxe.GRUB_DIR}"])
    _copy_if_changed(tftp_root / pxe.GRUB_CORE_EFI, tftp_root / pxe.GRUB_EFI_IMAGE)
    for rel, src in sources.items():
        _copy_if_changed(src, tftp_root / rel)


def _copy_boot_entries(build: Path, tftp_root: Path) -> None:
    """build/'s boot configs into the TFTP root, except installed VMs' per-MAC entries (under the state lock)."""
    config_dir, built = build.parent, build / pxe.BUILD_DIR
    installed = {rel for vm in read_installed(config_dir) for rel in boot_entries(config_dir, vm)}

    def installed_entries(directory: str, names: list[str]) -> set[str]:
        # Never copied, rather than copied and then deleted: an installed VM booting in between would reinstall.
        where = Path(directory).relative_to(built)
        return {name for name in names if str(where / name) in installed}

    if built.is_dir():
        shutil.copytree(built, tftp_root, dirs_exist_ok=True, ignore=installed_entries)
    _remove_stale_boot_entries(built, tftp_root)
    # copytree leaves an installed VM's entries uncopied, but cannot remove one that an older deploy put there:
    # that happens here. `installed` can name a VM whose entry is still deployed: the file edited by hand or
    # restored, or a mark stopped between writing the state and unlinking the entry (set_installed).
    for rel in installed:
        (tftp_root / rel).unlink(missing_ok=True)


def _remove_stale_boot_entries(built: Path, tftp_root: Path) -> None:
    """Per-MAC boot configs that the build no longer has: VMs removed from cluster.conf, or whose MAC changed.

    Left behind, such an entry would install over whatever machine later boots with that MAC.
    """
    for directory in pxe.PER_MAC_DIRS:
        if not (tftp_root / directory).is_dir():
            continue
        for path in (tftp_root / directory).iterdir():
            rel = f"{directory}/{path.name}"
            if pxe.PER_MAC_ENTRY.fullmatch(rel) and not (built / rel).exists():
                path.unlink()


# --- where it runs ---------------------------------------------------------------------------------------

def require_provision_server(cluster: Cluster, does: str, netns: str | None = None) -> None:
    """Refuse unless this machine (the lab: its namespace) is the provision server: it has [provision] interface,
    and the server's address is one of its own.

    Both are what the deployed dnsmasq needs: it binds to that interface alone (bind-interfaces), and the VMs are
    sent to that address. Anywhere else a task that writes config_dir and tftp_root and starts dnsmasq would make
    a workstation or a physical host serve DHCP, or fail halfway. ``does`` says what the task would change.
    """
    provision = cluster.site.provision
    addresses = interface_addresses(netns)
    mine: set[IPv4Address | IPv6Address] = set().union(*addresses.values())
    if provision.interface in addresses and provision.server in mine:
        return
    if provision.interface not in addresses:
        why = f"it has no interface {provision.interface!r}, [provision] interface in {cluster.site.path}"
    else:
        server = (f"the provision VM {provision.vm}'s address {provision.server}" if provision.vm
                  else f"[provision] server {provision.server}")
        why = f"{server} is not one of its addresses: {', '.join(sorted(map(str, mine))) or 'none'}"
    here = f"the lab's namespace {netns}" if netns else "this machine"
    raise KvmconfError(f"{here} is not the provision server ({why}): {does} on the machine it runs on; run it on the"
                       f" provision server ({provision.vm or provision.server}), or on the lab with KVMCONF_LAB set")


# --- building and deploying -------------------------------------------------------------------------------

def stage_build(cluster: Cluster, config_dir: Path) -> Path:
    """Render the cluster into config_dir/build (only files that changed are rewritten)."""
    build = build_dir_in(config_dir)
    write_tree(build, render_all(cluster), input_digest(cluster))
    return build


def deploy(cluster: Cluster, dnsmasq: Dnsmasq, log: Log = print) -> str:
    """Everything the provision server serves, from the cluster: build, TFTP tree, dnsmasq (reload or restart).

    All is rendered and checked first (the packages the TFTP root copies from, ``dnsmasq --test``): a deploy that
    would fail changes nothing, rather than serving new boot entries and preseeds beside the old dnsmasq.
    """
    config_dir, tftp_root = Path(cluster.site.provision.config_dir), Path(cluster.site.provision.tftp_root)
    files = render_all(cluster)
    tftp_sources(cluster, tftp_root)
    DnsmasqFiles.rendered(files).check()
    build = build_dir_in(config_dir)
    write_tree(build, files, input_digest(cluster))
    assemble_tftp(cluster, build, tftp_root)
    return deploy_dnsmasq(config_dir, dnsmasq, log)


def deploy_here(cluster: Cluster, log: Log = print) -> str:
    """`invoke provision-server` on the provision server itself: refused anywhere else; returns how to serve HTTP."""
    provision = cluster.site.provision
    base = http_base(provision.http_url)  # before anything changes: a URL it cannot serve stops the deploy
    require_provision_server(cluster, _deploys(cluster))
    deploy(cluster, system_dnsmasq(Path(provision.config_dir)), log)
    return f"serve the preseeds with: {serve_command(base, provision.config_dir, provision.tftp_root)}"


def serve_command(base: HttpBase, config_dir: str, tftp_root: str) -> str:
    """The shell command that serves HTTP, runnable as printed: this interpreter (the venv's, which has what the
    server imports; a bare python3 has not), from this checkout (where the kvmconf package is)."""
    argv = [sys.executable, "-m", "kvmconf.provision_server", "serve", f"--config-dir={config_dir}",
            *base.serve_args(), f"--tftp-root={tftp_root}"]
    return f"cd {shlex.quote(str(CHECKOUT))} && {shlex.join(argv)}"


def _deploys(cluster: Cluster) -> str:
    provision = cluster.site.provision
    return f"`invoke provision-server` writes {provision.config_dir} and {provision.tftp_root} and starts dnsmasq"


def reinstall(cluster: Cluster, name: str, log: Log = print, netns: str | None = None) -> None:
    """Undo an install mark: the VM's next PXE request gets its installer again (its disk must be empty to ask).

    Only on the provision server (``netns``: the lab's namespace), where the mark is.
    """
    vm = find_vm(cluster, name)
    if vm.install is not Install.PXE:
        raise KvmconfError(f"{name} is install={vm.install.value} in cluster.conf: only install=pxe VMs are"
                           " reinstalled over the network")
    site = cluster.site
    require_provision_server(cluster, f"`invoke reinstall` changes {Path(site.provision.config_dir) / STATE_FILE}"
                             f" and {site.provision.tftp_root}", netns)
    if not set_installed(Path(site.provision.config_dir), Path(site.provision.tftp_root), name, False):
        raise KvmconfError(f"{name} is not deployed on the provision server yet: run `invoke provision-server`")
    log(f"{name}: network install enabled again; it installs at its next PXE boot (with an empty disk)")


# --- HTTP --------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server: ProvisionHTTPServer

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        prefix = self.server.prefix_parts
        if parts[:len(prefix)] != prefix:
            self._answer(404, b"not found\n")
            return
        parts = parts[len(prefix):]
        if len(parts) == 2 and parts[0] == "installed":
            done = set_installed(self.server.config_dir, self.server.tftp_root, parts[1], True)
            self._answer(200 if done else 404, b"installed\n" if done else b"no such VM\n")
            return
        if len(parts) >= 2 and parts[0] in SERVED and not any(p.startswith(".") for p in parts):
            file = build_dir_in(self.server.config_dir) / Path(*parts)
            if file.is_file():
                self._answer(200, file.read_bytes())
                return
        self._answer(404, b"not found\n")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.client_address[0]} {self.command} {self.path} {code}\n"
        with self.server.lock, (self.server.config_dir / HTTP_LOG).open("a") as f:
            f.write(line)

    def log_message(self, format: str, *args: object) -> None:
        pass  # errors are in http.log through log_request


class ProvisionHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], config_dir: Path, tftp_root: Path, prefix: str = "") -> None:
        super().__init__(address, Handler)
        self.config_dir = config_dir
        self.tftp_root = tftp_root
        self.prefix_parts = [p for p in unquote(prefix).split("/") if p]  # http_url's path: every URL starts so
        self.lock = threading.Lock()


@dataclass(frozen=True)
class HttpBase:
    """Where the HTTP server listens, and the path it serves under: [provision] http_url."""

    host: str
    port: int
    prefix: str  # "" or "/a/path": the generated URLs are <http_url>/preseed/..., so that is served

    def serve_args(self) -> list[str]:
        return [f"--bind={self.host}:{self.port}", *([f"--prefix={self.prefix}"] if self.prefix else [])]


def http_base(http_url: str) -> HttpBase:
    """http_url as the provision server serves it; anything else is refused before anything is deployed.

    site.toml's own check (generators.site_values.parse_http_url, the same rule) refuses such a URL first, at its line.
    """
    parsed = parse_http_url(http_url)
    if parsed is None:
        raise KvmconfError(f"[provision] http_url {http_url!r}: the provision server serves plain HTTP, so it must"
                           " be http://host[:port][/path] (no https: a TLS proxy in front is not set up by kvmconf)")
    return HttpBase(*parsed)


# --- the lab ------------------------------------------------------------------------------------------------

def lab_dnsmasq(the_lab: Lab) -> Dnsmasq:
    """The lab's dnsmasq: started by kvmconf.lab inside the namespace, with its state in the lab directory."""
    return Dnsmasq(the_lab.dir / "dnsmasq.pid", lambda conf: start_dnsmasq(the_lab, conf))


def serve_lab(cluster: Cluster, the_lab: Lab, log: Log = print) -> str:
    """The provision server inside the lab's namespace: deploy (``cluster`` is already remapped), then HTTP."""
    base = http_base(cluster.site.provision.http_url)  # before anything changes: a URL it cannot serve stops here
    require_provision_server(cluster, _deploys(cluster), the_lab.netns)
    what = deploy(cluster, lab_dnsmasq(the_lab), log)
    # Recorded in Lab.pids, so that lab teardown stops it by name (before the lab's own daemons).
    pid_file = the_lab.dir / "http.pid"
    pid = the_lab.pids.get(HTTP_PID_KEY)
    if pid and alive(pid) and in_netns(pid, the_lab.netns):
        return what
    pid_file.unlink(missing_ok=True)
    config_dir = Path(cluster.site.provision.config_dir)
    server_log = the_lab.dir / "http-server.log"
    with server_log.open("ab") as out:
        logged_from = out.tell()  # the log is appended to across lab runs: only this start's lines tell why
        server = subprocess.Popen(
            ["ip", "netns", "exec", the_lab.netns, sys.executable, "-m", "kvmconf.provision_server", "serve",
             f"--config-dir={config_dir}", *base.serve_args(),
             f"--tftp-root={cluster.site.provision.tftp_root}", f"--pid-file={pid_file}"],
            cwd=CHECKOUT, env={**os.environ, "PYTHONPATH": str(CHECKOUT)}, stdin=subprocess.DEVNULL, stdout=out,
            stderr=out, start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        # A server that exited (its port taken, a bad argument) is told at once, not after the whole wait.
        if (status := server.poll()) is not None:
            with server_log.open("rb") as logged:
                logged.seek(logged_from)
                said = logged.read().decode(errors="replace").strip().splitlines()[-5:]
            raise KvmconfError(f"lab: the provision HTTP server exited with status {status} before it served"
                               f" ({server_log}): " + (" | ".join(said) or "it wrote nothing"))
        if time.monotonic() > deadline:
            raise KvmconfError(f"lab: the provision HTTP server did not start; see {server_log}")
        time.sleep(0.05)
    the_lab.pids[HTTP_PID_KEY] = int(pid_file.read_text())
    the_lab.save()
    log(f"lab: provision server at {cluster.site.provision.http_url} (pid {the_lab.pids[HTTP_PID_KEY]})")
    return what


def main(argv: list[str] | None = None) -> None:
    """`python -m kvmconf.provision_server serve`: the HTTP server, in the foreground (the lab runs it so)."""
    parser = argparse.ArgumentParser(prog="kvmconf.provision_server")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--config-dir", type=Path, required=True)
    parser.add_argument("--bind", required=True, help="host:port")
    parser.add_argument("--prefix", default="", help="the path of [provision] http_url: every URL served starts so")
    parser.add_argument("--tftp-root", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path)
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")

    server = ProvisionHTTPServer((host, int(port)), args.config_dir, args.tftp_root, args.prefix)
    if args.pid_file:
        replace_text(args.pid_file, f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
