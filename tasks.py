"""kvmconf tasks (`invoke --list`): act on the cluster's VMs through libvirt, and run a local lab.

Provision (provision, plan), inspect (status, capacity), run (start, stop, destroy, migrate), back up (backup,
restore, backup-status), serve installs (provision-server, reinstall), record SSH host keys (keyscan), and the
lab (lab.up, lab.down).

Each task is a few lines over the ``kvmconf`` package. They act on the cluster of
$KVMCONF_CLUSTER / $KVMCONF_SITE (default cluster.conf / site.toml), like `make`; with
$KVMCONF_LAB set (see `invoke lab.up`) on the lab instead of the hosts of site.toml.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from invoke import Collection, Context, Exit, task

try:  # what the tasks need beyond `make`'s venv, which has only what generating needs (requirements.txt)
    import libvirt  # noqa: F401
    import paramiko  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"kvmconf: the tasks need {missing.name} in .venv, and `make` alone installs only what"
                     " generating needs: run `make test-deps` once") from None

from generators.errors import ConfigError, UsageError
from generators.validate import load_cluster
from kvmconf import inputs, lab, lifecycle, provision_server
from kvmconf.cli import user_errors
from kvmconf.connection import HostReport, connections
from kvmconf.errors import KvmconfError
from kvmconf.plan import find_hosts, format_plan, make_plan, select_or_all
from kvmconf.provision import Options
from kvmconf.provision import provision as provision_vms
from kvmconf.status import format_status
from kvmconf.status import status as host_status

# Every option of a task has a default ("" for the VM a task acts on): invoke takes an argument without
# one as positional, and a positional argument swallows `--help` as its value. The task itself then
# says what is missing (a usage error, exit 2). Tasks with a --host option set auto_shortflags=False:
# its -h would hide invoke's own -h (--help).


def _ask(question: str) -> bool:
    """Yes only when the admin types it: Ctrl-D or Ctrl-C at the question is a no, like an empty answer."""
    if not sys.stdin.isatty():
        raise Exit(f"kvmconf: {question} There is no terminal to ask on: confirm with --force.", 1)
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        print()  # end the question's line, so that the message saying nothing was done starts on its own
        return False


def _print_per_host(report: str, hosts: Sequence[HostReport]) -> None:
    """Print a report of every host asked; exit 1 if one failed (the report says why), so scripts and cron notice."""
    print(report)
    if any(h.error for h in hosts):
        failed = ", ".join(h.host for h in hosts if h.error)
        raise Exit(f"kvmconf: could not ask every host: {failed} (the report above says why)", 1)


@task(iterable=["vm"], help={
    "vm": "a VM of cluster.conf (repeatable)", "all": "every VM, in cluster.conf order",
    "apply": "redefine domains whose definition changed (otherwise the diff is only shown)",
    "dry-run": "show what would be done, touch nothing", "reuse-disk": "attach a disk already at the VM's path",
    "start": "start newly defined VMs (--no-start leaves them shut off)"})
def provision(c: Context, vm: list[str], all: bool = False, apply: bool = False, dry_run: bool = False,
              reuse_disk: bool = False, start: bool = True) -> None:
    """Create the disks and domains of VMs (--vm NAME or --all); changed ones need --apply."""
    with user_errors():
        cluster = inputs.load()
        with connections(cluster) as conns:
            provision_vms(cluster, vm, conns, Options(apply, dry_run, reuse_disk, start), all_vms=all)


@task(iterable=["vm"], help={"vm": "only these VMs (repeatable; default: all)"})
def plan(c: Context, vm: list[str]) -> None:
    """Show what provision would create, change or leave, per host, as a diff; touches nothing."""
    with user_errors():
        cluster = inputs.load()
        with connections(cluster) as conns:
            result = make_plan(cluster, select_or_all(cluster, vm), conns, others=not vm, strict=False)
        _print_per_host(format_plan(result), result.hosts)


@task(iterable=["host"], auto_shortflags=False, help={"host": "only these physical hosts (repeatable; default: all)"})
def status(c: Context, host: list[str]) -> None:
    """Show a table per physical host: state, IP, RAM, vCPUs, disk, autostart, drift from cluster.conf."""
    with user_errors():
        cluster = inputs.load()
        find_hosts(cluster, host)  # every unknown --host, in one message, before any host is contacted
        with connections(cluster) as conns:
            result = host_status(cluster, conns, host)
        _print_per_host(format_status(result), result)


@task(help={"vm": "the VM", "dry-run": "show what would be done"})
def start(c: Context, vm: str = "", dry_run: bool = False) -> None:
    """Start a defined VM."""
    with user_errors(), connections(cluster := inputs.load()) as conns:
        lifecycle.start(cluster, vm, conns, dry_run)


@task(help={"vm": "the VM", "force": "power it off at once instead of asking the guest to shut down",
            "dry-run": "show what would be done"})
def stop(c: Context, vm: str = "", force: bool = False, dry_run: bool = False) -> None:
    """Shut a VM down (ACPI), or power it off with --force."""
    with user_errors(), connections(cluster := inputs.load()) as conns:
        lifecycle.stop(cluster, vm, conns, force, dry_run)


@task(help={"vm": "the VM", "purge": "also remove its disk and seed ISO",
            "force": "do not ask before powering off a running VM or purging",
            "dry-run": "show what would be done"})
def destroy(c: Context, vm: str = "", purge: bool = False, force: bool = False, dry_run: bool = False) -> None:
    """Power off and undefine a VM, asking first if it runs; its disk is kept unless --purge (asks too)."""
    with user_errors(), connections(cluster := inputs.load()) as conns:
        lifecycle.destroy(cluster, vm, conns, purge, None if force else _ask, dry_run)


def _lab_dir(directory: str) -> Path:
    return Path(directory) if directory else inputs.lab_dir() or lab.DEFAULT_DIR


@task(name="up", help={"dir": f"the lab's directory: a new or empty one, or a lab's (default: $KVMCONF_LAB or"
                              f" {lab.DEFAULT_DIR})",
                       "netns": f"the network namespace's name: letters, digits, _ . - (default: {lab.DEFAULT_NETNS};"
                                " a running lab keeps its own)",
                       "kvm": "use hardware virtualisation (only where KVM really runs guests; default: qemu)"})
def lab_up(c: Context, dir: str = "", netns: str = "", kvm: bool = False) -> None:
    """Start a throwaway lab: a network namespace, libvirtd and dnsmasq for the cluster's VMs."""
    directory = _lab_dir(dir)
    with user_errors():
        cluster = load_cluster(inputs.cluster_path(), inputs.site_path())
        lab.up(cluster, directory, netns or None, kvm)  # "": not given, which a running lab's refresh must know
    print(f"act on the lab with: export KVMCONF_LAB={directory.absolute()}   (then: invoke provision --all)")


@task(name="down", help={"dir": f"the lab's directory (default: $KVMCONF_LAB or {lab.DEFAULT_DIR})"})
def lab_down(c: Context, dir: str = "") -> None:
    """Stop the lab: its VMs, libvirtd, virtlogd and dnsmasq (by PID), its namespace and files."""
    directory = _lab_dir(dir)
    with user_errors():
        if not lab.down(directory):
            print(f"no lab in {directory}")


def _running_lab() -> lab.Lab | None:
    """The lab of $KVMCONF_LAB (inputs.load has checked that it runs), else None: the real provision server."""
    directory = inputs.lab_dir()
    return lab.Lab.load(directory.absolute()) if directory else None


@task(name="provision-server")
def provision_server_task(c: Context) -> None:
    """Be the provision server (run on it, or in the lab): TFTP tree, dnsmasq (SIGHUP or checked restart), HTTP
    (the lab's is started; on a real server, the command that serves it is printed).

    Refused on any machine that lacks [provision] interface or the provision server's address.
    """
    with user_errors():
        cluster = inputs.load()
        the_lab = _running_lab()
        if the_lab is not None:
            provision_server.serve_lab(cluster, the_lab)
            return
        print(provision_server.deploy_here(cluster))


@task(help={"vm": "the install=pxe VM to install again at its next network boot"})
def reinstall(c: Context, vm: str = "") -> None:
    """Give an installed VM its network installer again (undoes the mark its install left); on the provision server."""
    with user_errors():
        cluster = inputs.load()
        the_lab = _running_lab()
        provision_server.reinstall(cluster, vm, netns=the_lab.netns if the_lab else None)


@task(name="backup", iterable=["vm"], help={
    "vm": "a VM of cluster.conf (repeatable)",
    "all": "every VM with backup=yes whose host is this machine (named by hostname, address or uri: README,"
           " Backups); exits 1 when no host of site.toml is this machine"})
def backup_task(c: Context, vm: list[str], all: bool = False) -> None:
    """Back up VMs (live, full or incremental; shut-off VMs from their images); exits 1 if any failed."""
    from kvmconf.backup.cluster import backup as backup_vms

    with user_errors():
        cluster = inputs.load()
        with connections(cluster) as conns:
            outcomes = backup_vms(cluster, vm, all, conns, progress=sys.stderr.isatty())
        failed = [o.vm for o in outcomes if not o.ok or o.error]
        if failed:
            raise Exit(f"kvmconf: backup failed for {', '.join(failed)}", 1)


@task(name="restore", help={"vm": "the VM", "at": "the restore point: its UTC time, as 20261121T023000Z, or a beginning"
                                                 " of it that only one point has (default: the newest)",
                            "to": "write the flat image(s) here, 0600: an existing directory receives"
                                  " <vm>-<disk>.<format> per disk; for a one-disk VM, a new file in an existing"
                                  " directory. Never overwrites a file",
                            "force": "replace the VM's own disks (it must be shut off)",
                            "nas": "restore from the copies on the NAS ([backup] nas_dir, mounted), as when the"
                                   " local backup disk is lost"})
def restore_task(c: Context, vm: str = "", at: str = "", to: str = "", force: bool = False, nas: bool = False) -> None:
    """Rebuild a VM's disks from a restore point, verified; in place needs the VM shut off and --force.

    --to is an existing directory, which receives <vm>-<disk>.<format> per disk, or, for a one-disk VM, a new
    file in an existing directory; a VM with several disks needs the directory. Progress shows on a terminal.
    """
    from kvmconf.backup.cluster import restore_vm

    with user_errors():
        cluster = inputs.load()
        with connections(cluster) as conns:
            restore_vm(cluster, vm, at or None, Path(to) if to else None, force, conns, from_nas=nas)


@task(name="backup-status", iterable=["vm"], help={
    "vm": "only these VMs (repeatable; default: the VMs with backup=yes whose host is this machine, as"
          " `backup --all` takes them)",
    "nagios": "one line and the Nagios exit code (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN: the check failed)"})
def backup_status(c: Context, vm: list[str], nagios: bool = False) -> None:
    """Per VM: last good backup, its age, chain length, sizes and the last failure."""
    from kvmconf.backup import report
    from kvmconf.backup.cluster import require_backup_dir, status_rows

    if nagios:  # Nagios reads exit 1 as WARNING: a check that cannot tell is UNKNOWN (3), with why on its line
        try:
            rows, limit = status_rows(inputs.load(), vm)
            code, text = report.nagios(rows, limit)
            line = report.plugin_output(text, report.perfdata(rows, limit))
        except Exception as err:  # any failure, a bug included, must reach Nagios as UNKNOWN
            why = f"{type(err).__name__}: {err}"
            code, line = 3, report.plugin_output(f"BACKUP UNKNOWN - backup-status failed: {why}", "")
            if not isinstance(err, KvmconfError | ConfigError | UsageError):
                # A bug: its traceback after the line, on stdout, as Nagios's long output. On stderr, check_by_ssh
                # would show its first line, "Traceback (most recent call last):", in place of ours.
                line += "\n" + traceback.format_exc().rstrip().replace("|", "\u00a6")
        print(line)
        raise Exit(code=code)
    with user_errors():
        cluster = inputs.load()
        rows, limit = status_rows(cluster, vm)
        print(report.format_table(rows, limit))
        require_backup_dir(cluster)  # every VM above reads "the [backup] dir ... does not exist" then: exit 1


@task(name="backup-verify", iterable=["vm"], help={
    "vm": "a VM of cluster.conf (repeatable)",
    "all": "every VM with backup=yes whose host is this machine, as `backup --all` takes them"})
def backup_verify(c: Context, vm: list[str], all: bool = False) -> None:
    """Read every restore point back (and its NAS copy) against its checksums; exits 1 if any is damaged.

    What is damaged is recorded: the next backup starts a new chain, and backup-status and Nagios say it.
    """
    from kvmconf.backup.cluster import verify_backups

    with user_errors():
        damaged = verify_backups(inputs.load(), vm, all)
        if damaged:
            raise Exit(f"kvmconf: damaged restore points for {', '.join(damaged)}", 1)


@task(iterable=["host"], auto_shortflags=False, help={
    "host": "only these physical hosts (repeatable; default: all)",
    "offline": "from cluster.conf and site.toml only, without asking libvirt"})
def capacity(c: Context, host: list[str], offline: bool = False) -> None:
    """Show per physical host: RAM/vCPUs/disk committed vs capacity and overcommit, pinned CPUs, VFs, PCI."""
    from kvmconf.capacity import capacity as host_capacity
    from kvmconf.capacity import format_capacity

    with user_errors():
        cluster = inputs.load()
        find_hosts(cluster, host)  # every unknown --host, in one message, before any host is contacted
        if offline:
            print(format_capacity(host_capacity(cluster, None, host)))
            return
        with connections(cluster) as conns:
            result = host_capacity(cluster, conns, host)
        _print_per_host(format_capacity(result), result)


@task(help={"vm": "the VM to move", "to": "the physical host to move it to",
            "cold": "shut the VM down and copy its disk, even when it runs (default: live when it runs)",
            "force": "with --cold: power the VM off at once instead of asking the guest to shut down",
            "edit": "set host=<to> on the VM's line of cluster.conf afterwards"})
def migrate(c: Context, vm: str = "", to: str = "", cold: bool = False, force: bool = False,
            edit: bool = False) -> None:
    """Move a VM to another host: live when it runs, else cold; the source is undefined once the target runs."""
    from kvmconf import migrate as moving

    with user_errors():
        cluster = inputs.load()
        with connections(cluster) as conns:
            moved = moving.migrate(cluster, vm, to, conns, force, cold=cold)
        path = inputs.cluster_path()
        if edit:
            moving.edit_host(path, moved, to)
            print(f"{path}:{moved.line}: set host={to}")
        else:
            _old, new = moving.host_line(path, moved, to)
            print(f"{path}:{moved.line} must now say host={to} (or run with --edit); the line becomes:\n{new}")


@task(iterable=["vm"], help={"vm": "only this VM (repeatable; default: every VM of cluster.conf)",
                             "ssh-config": "the ssh config naming the VMs (default: $KVMCONF_SSH_CONFIG, else"
                                           " ssh/config in $KVMCONF_BUILD or build/)",
                             "accept-changed": "replace recorded keys that changed (after checking why!)"})
def keyscan(c: Context, vm: list[str], ssh_config: str = "", accept_changed: bool = False) -> None:
    """Record the VMs' SSH host keys in the known_hosts file of the generated ssh config (for fab deploy)."""
    from kvmconf.cli import say
    from kvmconf.keyscan import keyscan as scan_keys
    from kvmconf.remote import generated_ssh_config

    with user_errors():
        cluster = load_cluster(inputs.cluster_path(), inputs.site_path())
        names = [v.name for v in select_or_all(cluster, vm)]
        scan_keys(names, generated_ssh_config(ssh_config), accept_changed, progress=say)  # a line per VM as it goes


ns = Collection(provision, plan, status, start, stop, destroy, Collection("lab", lab_up, lab_down),
                provision_server_task, reinstall, backup_task, restore_task, backup_status, backup_verify, capacity,
                migrate, keyscan)
