"""Fabric tasks (`fab --list`): put the recipes of hosts/ on the VMs, and prepare the physical hosts.

They act on the cluster of $KVMCONF_CLUSTER / $KVMCONF_SITE (default cluster.conf / site.toml) and reach the
VMs through the generated ssh config ($KVMCONF_SSH_CONFIG, default ssh/config in $KVMCONF_BUILD or build/; run
`make` first, and `invoke keyscan` once so host keys are known).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from fabric import Connection, task
from invoke import Context, Exit

from generators.errors import shown
from kvmconf import inputs
from kvmconf.cli import INTERRUPTED, say, user_errors
from kvmconf.deploy import Options, RunReport, VmReport, run_cluster
from kvmconf.errors import WrongUsage
from kvmconf.recipes import RECIPE_DIR, unused_recipes
from kvmconf.remote import chosen_ssh_config, generated_ssh_config


def _run(c: Context, vm: list[str], full: bool, parallel: str, ssh_config: str, dry_run: bool) -> None:
    with user_errors():
        _refuse_fabric_hosts(c, "choose VMs with --vm")
        at_a_time = _parallel(parallel)
        recipes = _recipe_dir()
        cluster = inputs.load()
        options = Options(generated_ssh_config(_ssh_config_option(c, ssh_config)), at_a_time, dry_run, recipes)
        for note in unused_recipes(cluster, recipes or RECIPE_DIR):
            print(note, file=sys.stderr, flush=True)
        report = run_cluster(cluster, vm, full, options, progress=_print_vm, interrupted=_print_interrupted)
    _print(report, dry_run)


def _refuse_fabric_hosts(c: Context, instead: str) -> None:
    """Refuse Fabric's -H/--hosts: it would run the whole task once per name given, each time on every VM."""
    if isinstance(c, Connection):
        raise WrongUsage(f"fab -H/--hosts does not choose kvmconf's machines: {instead}")


def _ssh_config_option(c: Context, option: str) -> str:
    """--ssh-config after the task's name, else Fabric's own -S/--ssh-config before it: both name the ssh config.

    Fabric keeps the core flag for its own connections, which these tasks do not use: without this it was
    taken, and silently ignored. Fabric also sets that path from ``ssh_config_path`` in its config files
    (~/.fabric.yaml): a setting for the admin's own Fabric work, which must not send a deploy elsewhere, so
    when one is set only --ssh-config counts.
    """
    if option or getattr(c.config, "ssh_config_path", None):
        return option
    return getattr(c.config, "_runtime_ssh_path", None) or ""


def _recipe_dir() -> Path | None:
    """$KVMCONF_RECIPES: another hosts/ directory (the bench uses its own); None (hosts/) when unset or empty."""
    value = os.environ.get("KVMCONF_RECIPES", "")
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        # A usage error, as a missing ssh config is: a misspelt directory would otherwise have no recipes at all,
        # and the deploy would quietly push nothing.
        state = "is not a directory" if path.exists() else "does not exist"
        raise WrongUsage(f"{value} {state} (named by KVMCONF_RECIPES)")
    return path


def _parallel(value: str) -> int:
    # The task takes --parallel as a string: invoke would turn a non-number into a traceback, and 0 or -3 must
    # be refused, not quietly run one at a time.
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise WrongUsage(f"--parallel {shown(value)}: expected a whole number >= 1 (how many VMs at a time)")
    return int(value)


def _print_vm(report: VmReport) -> None:
    """A VM's diffs (dry run) and its line, as soon as it is done: a long run shows its progress."""
    for diff in report.diffs:
        say(f"== {report.vm}\n" + diff.removesuffix("\n"))
    say(report.line())


def _print_interrupted(running: list[str]) -> None:
    """At Ctrl-C, at once: nothing else may show for as long as the VMs still being deployed take."""
    print(f"kvmconf: interrupted: letting {', '.join(running)} end (stopped midway, an apt-get or a hook would be"
          " left half done; Ctrl-\\ stops at once all the same); no other VM is started", file=sys.stderr, flush=True)


def _print(report: RunReport, dry_run: bool) -> None:
    print(("(dry run: nothing changed)\n" if dry_run else "") + report.summary())
    if report.interrupted:
        raise Exit(INTERRUPTED, 1)
    if report.failed:
        raise Exit(code=1)


_VM_SSH_CONFIG_HELP = "ssh config naming the VMs (default: $KVMCONF_SSH_CONFIG, else ssh/config of the build)"


@task(iterable=["vm"], help={"vm": "only this VM (repeatable; default: all, in cluster.conf order)",
                             "parallel": "VMs at a time, a whole number >= 1, in waves by after="
                                         " (default 1: one by one)",
                             "ssh-config": _VM_SSH_CONFIG_HELP,
                             "dry-run": "print the packages it would install, the diff of every file it would"
                                        " change and the hooks it would run; change nothing"})
def deploy(c: Context, vm: list[str], parallel: str = "1", ssh_config: str = "", dry_run: bool = False) -> None:
    """Install packages, files and hooks of hosts/ on the VMs, in cluster.conf order."""
    _run(c, vm, True, parallel, ssh_config, dry_run)


@task(name="update-confs", iterable=["vm"],
      help={"vm": "only this VM (repeatable; default: all, in cluster.conf order)",
            "parallel": "VMs at a time, a whole number >= 1, in waves by after= (default 1: one by one)",
            "ssh-config": _VM_SSH_CONFIG_HELP,
            "dry-run": "print the diff of every file that would change; change nothing"})
def update_confs(c: Context, vm: list[str], parallel: str = "1", ssh_config: str = "", dry_run: bool = False) -> None:
    """Push only the files that differ on the VMs, back up what they replace, reload only their services."""
    _run(c, vm, False, parallel, ssh_config, dry_run)


# --host defaults to "": without a default, invoke takes it as positional and `fab kvm-setup --help` as the
# host's name; find_host then says that it is missing. No short flags: -h would be --host, not --help.
@task(name="kvm-setup", auto_shortflags=False,
      help={"host": "the physical host of site.toml (required)",
            "ssh-config": "ssh config to reach it (default: $KVMCONF_SSH_CONFIG, else your own, ~/.ssh/config)",
            "dry-run": "print what would be done (with diffs); change nothing",
            "dry-run-network": "do everything but the bridges, which are only printed"})
def kvm_setup(c: Context, host: str = "", ssh_config: str = "", dry_run: bool = False,
              dry_run_network: bool = False) -> None:
    """Prepare a physical host: packages, bridges, forwarding, br_netfilter, nested check, directories, VF pools."""
    from kvmconf.hostsetup import setup

    header = ["(dry run: nothing changed)"] if dry_run else []

    def progress(line: str) -> None:  # each step's line as it ends: installing packages takes minutes
        print(*header, f"{host}: {line}", sep="\n", flush=True)
        header.clear()  # said once, above the first line: not above an error that stops the task before any
    with user_errors():
        _refuse_fabric_hosts(c, "name the physical host with --host")
        report = setup(inputs.load(), host, chosen_ssh_config(_ssh_config_option(c, ssh_config)), dry_run,
                       dry_run_network, progress=progress)
    for diff in report.diffs:
        print(diff, end="" if diff.endswith("\n") else "\n")
    if report.error:
        raise Exit(f"kvmconf: {host}: FAILED at {report.error}", 1)
