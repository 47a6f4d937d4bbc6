"""The provision server's entry points: `invoke provision-server` and `invoke reinstall` on the server itself,
the same inside the lab's namespace, and ``python -m kvmconf.provision_server serve`` (its HTTP server).

The provision server is dnsmasq (DHCP/DNS/TFTP) with the generated config (kvmconf.dnsmasq_control), the TFTP
root (kvmconf.tftp_tree) and HTTP for installers (kvmconf.install_http), all made from its copy of the build
in ``[provision] config_dir`` (kvmconf.provision_state). This module says where that may run and deploys it.

Checked before anything changes: a deploy renders everything in memory, checks that this machine has every
file the TFTP root copies (pxelinux, GRUB, the netboot installers) and runs ``dnsmasq --test`` on the new
main conf together with every hostsfile line. Only then does it write build/, the TFTP root and
config_dir/dnsmasq: a failed check leaves all of them, and the running daemon, as they were. A new dnsmasq
that does not start gets the previous config_dir/dnsmasq, build/ and TFTP boot entries back (the installers
and loaders copied from packages stay: nothing boots a new one without an entry), so that DHCP, TFTP and HTTP
serve one cluster, the previous one.

The lab (kvmconf.lab) starts the server through :func:`serve_lab`; this module does not import the lab: it
needs only what :class:`LabPlace` names of it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Protocol

from generators.build import input_digest, render_all
from generators.files import replace_text
from generators.locations import CHECKOUT  # `-m kvmconf...` runs from it
from generators.model import Cluster, Install
from generators.writer import Tree, write_tree
from kvmconf.dnsmasq_control import (
    Dnsmasq,
    DnsmasqDidNotStart,
    DnsmasqFiles,
    deploy_dnsmasq,
    netns_dnsmasq,
    system_dnsmasq,
)
from kvmconf.errors import KvmconfError
from kvmconf.install_http import HttpBase, ProvisionHTTPServer, http_base
from kvmconf.interfaces import interface_addresses
from kvmconf.plan import find_vm
from kvmconf.processes import alive, in_netns
from kvmconf.provision_state import STATE_FILE, boot_entries, build_dir_in, build_kept_aside
from kvmconf.tftp_tree import assemble_tftp, copy_boot_entries, forget_removed_installed, set_installed, tftp_sources

Log = Callable[[str], None]

HTTP_PID_KEY = "provision-http"  # the HTTP server's entry in the lab's pids


class LabPlace(Protocol):
    """What the provision server needs of a running lab (kvmconf.lab.Lab): its directory, its namespace, and the
    record of the processes it started, which lab teardown stops."""

    dir: Path
    netns: str
    pids: dict[str, int]

    def save(self) -> None: ...


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


def stage_build(cluster: Cluster, config_dir: Path, files: Tree | None = None) -> Path:
    """The cluster into config_dir/build (only files that changed are rewritten); ``files``: it, rendered already."""
    build = build_dir_in(config_dir)
    write_tree(build, render_all(cluster) if files is None else files, input_digest(cluster))
    return build


def deploy(cluster: Cluster, dnsmasq: Dnsmasq, log: Log = print) -> str:
    """Everything the provision server serves, from the cluster: build, TFTP tree, dnsmasq (reload or restart).

    All is rendered and checked first (the packages the TFTP root copies from, ``dnsmasq --test``): a deploy that
    fails a check changes nothing, rather than serving new boot entries and preseeds beside the old dnsmasq. One
    whose new dnsmasq does not start puts build/, the TFTP boot entries and the dnsmasq config back as they were
    (see the module docstring) and raises DnsmasqDidNotStart.
    """
    config_dir, tftp_root = Path(cluster.site.provision.config_dir), Path(cluster.site.provision.tftp_root)
    files = render_all(cluster)
    tftp_sources(cluster, tftp_root)
    DnsmasqFiles.rendered(files).check()
    with build_kept_aside(config_dir) as put_back:
        build = stage_build(cluster, config_dir, files)
        assemble_tftp(cluster, build, tftp_root)
        try:
            what = deploy_dnsmasq(config_dir, dnsmasq, log)
        except DnsmasqDidNotStart:
            # DHCP reserves the previous VMs again (or none runs): without this, new VMs' installers would be
            # served with no reservation, and removed VMs' entries would be gone while dnsmasq still answers them.
            put_back()
            copy_boot_entries(build, tftp_root)
            raise
    forget_removed_installed(config_dir)
    return what


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
    config_dir, tftp_root = Path(site.provision.config_dir), Path(site.provision.tftp_root)
    if not set_installed(config_dir, tftp_root, name, False):
        raise KvmconfError(f"{name} is not deployed on the provision server yet: run `invoke provision-server`")
    if not any((tftp_root / rel).is_file() for rel in boot_entries(config_dir, name)):
        # Deployed while it was install=cloud or none: its build has no installer entry to put back. The mark is
        # gone, so the deploy that makes one serves it.
        raise KvmconfError(f"{name} has no installer entry in {build_dir_in(config_dir) / 'tftp'}: the provision"
                           " server's build is from before it was install=pxe; run `invoke provision-server`")
    log(f"{name}: network install enabled again; it installs at its next PXE boot (with an empty disk)")


def lab_dnsmasq(the_lab: LabPlace) -> Dnsmasq:
    """The lab's dnsmasq: inside its namespace, with its state in the lab directory and each start in its pids."""
    def started(pid: int) -> None:
        the_lab.pids["dnsmasq"] = pid
        the_lab.save()

    return netns_dnsmasq(the_lab.netns, the_lab.dir, started)


def serve_lab(cluster: Cluster, the_lab: LabPlace, log: Log = print) -> str:
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
    if not build_dir_in(args.config_dir).is_dir():
        # Else it would serve 404 for everything, or, without config_dir, answer nothing (http.log cannot be opened).
        parser.exit(1, f"kvmconf: {build_dir_in(args.config_dir)} is missing: run `invoke provision-server` first,"
                       " which builds it, and serve its --config-dir ([provision] config_dir)\n")

    try:
        server = ProvisionHTTPServer((host, int(port)), args.config_dir, args.tftp_root, args.prefix)
    except OSError as err:  # the admin's to fix, as printed: no traceback
        parser.exit(1, f"kvmconf: cannot serve HTTP on {args.bind}: {err.strerror or err} (it must be an address of"
                       " this machine and a port no other server holds: [provision] http_url names them)\n")
    if args.pid_file:
        replace_text(args.pid_file, f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how the admin stops the server run in the foreground, as printed: no traceback, status 0
    finally:
        server.server_close()
        if args.pid_file:
            args.pid_file.unlink(missing_ok=True)  # it would name a PID that another process gets later


if __name__ == "__main__":
    main()
