"""dnsmasq on the provision server: which one is ours, checking a new configuration, deploying it.

A deploy that changes only the hostsfiles or the hosts file sends SIGHUP (dnsmasq re-reads those, same
PID); a changed main conf restarts dnsmasq. Either is checked first with ``dnsmasq --test`` on the main
conf together with every hostsfile line (which --test alone never reads): a failed check leaves the running
daemon and its files as they were. A new dnsmasq that does not start (its interface or port taken) gets the
previous files back (none, on a first deploy) and, if it ran before, their dnsmasq restarted; the deploy fails
saying so (:class:`DnsmasqDidNotStart`, on which kvmconf.provision_server puts build/ and the TFTP boot entries
back too). A deploy stopped between writing the files and signalling dnsmasq (Ctrl-C, SIGTERM) leaves
config_dir/dnsmasq.pending: the next deploy restarts dnsmasq, since the files alone no longer tell what it runs on.

The hostsfile lines carry no tags, because dnsmasq 2.90 crashed (segfault) on SIGHUP after it had answered
a VM whose hostsfile line set one (``set:install``): an install mark changes the TFTP root, never dnsmasq.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from generators.files import replace_text
from kvmconf.errors import KvmconfError
from kvmconf.processes import alive, command_line, output_of, stop_pid
from kvmconf.provision_state import build_dir_in

Log = Callable[[str], None]

PENDING = "dnsmasq.pending"  # in config_dir while a deploy changes config_dir/dnsmasq and signals dnsmasq


class DnsmasqDidNotStart(KvmconfError):
    """The new configuration's dnsmasq did not start; config_dir/dnsmasq holds the previous files again (none if
    there were none), and the message says whether a dnsmasq of ours runs."""


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


def netns_dnsmasq(netns: str, state_dir: Path, started: Callable[[int], None]) -> Dnsmasq:
    """dnsmasq inside the network namespace ``netns`` (the lab's), its pid file, leases and log in ``state_dir``;
    ``started`` is told each new PID."""
    pid_file = state_dir / "dnsmasq.pid"

    def start(conf: Path) -> None:
        pid_file.unlink(missing_ok=True)
        # The generated configuration as deployed; the command line only keeps dnsmasq's own state in state_dir
        # (pid, leases, log), stops DNS forwarding out of the namespace, and runs it as root so it can read
        # state_dir wherever that is (a test's private temporary directory included).
        output_of(["ip", "netns", "exec", netns, "dnsmasq", f"--conf-file={conf}", f"--pid-file={pid_file}",
                   f"--dhcp-leasefile={state_dir / 'dnsmasq.leases'}", f"--log-facility={state_dir / 'dnsmasq.log'}",
                   "--log-dhcp", "--no-resolv", "--user=root", "--group=root"], context="lab: ")
        # dnsmasq has written its pid file when the command returns: it writes it before its first process exits.
        pid = dnsmasq.pid()
        if pid is None:
            raise KvmconfError(f"lab: dnsmasq exited without a running daemon in {pid_file} (see its log in"
                               f" {state_dir / 'dnsmasq.log'})")
        started(pid)

    dnsmasq = Dnsmasq(pid_file, start)
    return dnsmasq


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

    def remove_from(self, live: Path) -> None:
        """Remove these files from ``live`` (a first deploy undone): what else is there is not ours to remove."""
        for name in self.hosts:
            (live / "dhcp-hosts" / name).unlink(missing_ok=True)
        if (live / "dhcp-hosts").is_dir() and not any((live / "dhcp-hosts").iterdir()):
            (live / "dhcp-hosts").rmdir()
        if self.addn is not None:
            (live / "hosts").unlink(missing_ok=True)
        (live / "dnsmasq.conf").unlink()


def deploy_dnsmasq(config_dir: Path, dnsmasq: Dnsmasq, log: Log = print) -> str:
    """Make config_dir/dnsmasq from config_dir/build/dnsmasq and the installed state; reload or restart.

    Returns what happened: "unchanged", "reloaded" (SIGHUP), "restarted" or "started". A new dnsmasq that does
    not start brings the previous files back, and their dnsmasq if one ran (DHCP keeps running), and raises
    DnsmasqDidNotStart.
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
    # There from before the files change until dnsmasq has read them: one left over is a deploy stopped in between
    # (Ctrl-C, SIGTERM), whose dnsmasq may still run on the files before. Compared with the files alone, the next
    # deploy would find nothing to do and leave it so: a new VM without its reservation, a removed VM's still there.
    pending = config_dir / PENDING
    interrupted = pending.exists()
    pending.touch()
    try:
        new.write_over(live, old)
        if old is not None and old.conf == new.conf and running and not interrupted:
            what = "reloaded" if old != new else "unchanged"
            if old != new:
                dnsmasq.reload()
        else:
            _restart(dnsmasq, live, new, old, running)
            what = "restarted" if running else "started"
    except KvmconfError:
        pending.unlink(missing_ok=True)  # the files there are what dnsmasq runs on (or none runs): nothing pending
        raise
    pending.unlink(missing_ok=True)
    log(f"provision server: dnsmasq {what}")
    return what


def _restart(dnsmasq: Dnsmasq, live: Path, new: DnsmasqFiles, previous: DnsmasqFiles | None, running: bool) -> None:
    """(Re)start dnsmasq on ``new``; if it does not start, bring back ``previous`` (the files before, None for none)
    and, if one was ``running``, its dnsmasq, and raise."""
    try:
        dnsmasq.restart(live / "dnsmasq.conf")
    except KvmconfError as failed:
        why = f"dnsmasq did not start with the new configuration: {failed}"
        if previous is None:
            new.remove_from(live)
        else:
            previous.write_over(live, new)
        if not running or previous is None:
            before = "no dnsmasq of ours was running before" if not running else "the running one's files were gone"
            files = "the previous files are back" if previous else f"the new files are removed from {live}"
            raise DnsmasqDidNotStart(f"{why}; {before}, so none runs now; {files}") from failed
        try:
            dnsmasq.restart(live / "dnsmasq.conf")
        except KvmconfError as again:
            raise DnsmasqDidNotStart(f"{why}; the previous configuration, put back, did not start either: {again};"
                                     " no dnsmasq of ours runs now") from failed
        raise DnsmasqDidNotStart(f"{why}; the previous configuration is back and its dnsmasq runs again"
                                 f" (pid {dnsmasq.pid()})") from failed
