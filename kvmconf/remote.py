"""SSH to a VM the way `ssh <vm>` would: address, port, user, keys and known_hosts from the generated ssh config.

``ssh -G`` resolves the config (Include, Match, defaults) exactly as OpenSSH does, so Fabric connects where the
admin's own ssh would. Host keys are checked against the config's UserKnownHostsFile only; an unknown or
changed key is refused (Fabric's default would add any key silently).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fabric import Config, Connection
from invoke.runners import Result
from paramiko import BadHostKeyException, ChannelException, RejectPolicy, SSHException

from generators.locations import build_dir, the_checkout
from kvmconf.errors import KvmconfError, WrongUsage

GENERATED_SSH_CONFIG = Path("ssh/config")  # where `make` writes it, inside its build directory
# paramiko's transport thread logs a failed handshake (with its traceback) at ERROR, then hands the same error to
# connect(), which reports it as a RemoteError naming the machine. Nothing configures logging here, so logging's
# last resort printed those ~20 lines to stderr before kvmconf's own message. A NullHandler ends that; records
# still propagate to any handler an admin sets up to debug SSH (logging.basicConfig(level=logging.DEBUG)).
logging.getLogger("paramiko").addHandler(logging.NullHandler())
# How paramiko words a connection that closed (or timed out) before the server sent "SSH-2.0-...".
_NO_BANNER = "Error reading SSH protocol banner"


def chosen_ssh_config(explicit: str = "") -> Path | None:
    """The ssh config the admin chose: `explicit` (--ssh-config), else $KVMCONF_SSH_CONFIG; None if neither."""
    if explicit:
        value, where = explicit, "--ssh-config"
    else:  # empty counts as unset, as for KVMCONF_BUILD
        value, where = os.environ.get("KVMCONF_SSH_CONFIG", ""), "KVMCONF_SSH_CONFIG"
    if not value:
        return None
    path = Path(value).expanduser()  # as `ssh -F` does: `--ssh-config=~/x` reaches us unexpanded
    if not path.is_file():
        # A usage error (exit 2), like a missing cluster.conf: the admin named a file that is not there.
        raise WrongUsage(f"{value} does not exist (named by {where})")
    return path


def generated_ssh_config(explicit: str = "") -> Path:
    """The ssh config naming the VMs: the chosen one, else the one `make` writes in $KVMCONF_BUILD (or build/)."""
    chosen = chosen_ssh_config(explicit)
    if chosen:
        return chosen
    build = build_dir(the_checkout())  # `make`'s: the checkout's build/ unless $KVMCONF_BUILD says otherwise
    path = build / GENERATED_SSH_CONFIG
    if not path.is_file():
        # `make` writes to $KVMCONF_BUILD as this lookup reads it: say so, so the two are seen to agree.
        into = f" in {build}/, from KVMCONF_BUILD" if os.environ.get("KVMCONF_BUILD") else ""
        raise KvmconfError(f"{path} does not exist: run `make` first (it generates the ssh config{into})")
    return path


class RemoteError(KvmconfError):
    """A VM could not be reached, or a command on it failed."""


@dataclass(frozen=True)
class Target:
    name: str  # the VM name as in cluster.conf and the ssh config's Host line
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts: str
    ssh_config: Path | None = None  # the ssh config it was resolved from (None: the admin's own)


def resolve(name: str, ssh_config: Path | None) -> Target:
    """What `ssh -F ssh_config name` (or plain `ssh name` when ssh_config is None) would connect to."""
    config = ["-F", str(ssh_config)] if ssh_config else []
    proc = subprocess.run(["ssh", "-G", *config, "--", name], capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        raise RemoteError(f"{name}: ssh -G -F {ssh_config} failed: {proc.stderr.strip()}")
    values: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    known = values.get("userknownhostsfile", ["~/.ssh/known_hosts"])[0].split()[0]
    identities = tuple(p for p in (os.path.expanduser(f) for f in values.get("identityfile", [])) if os.path.exists(p))
    return Target(name, values["hostname"][0], int(values["port"][0]), values["user"][0], identities,
                  os.path.expanduser(known), ssh_config)


def known_hosts_name(target: Target) -> str:
    """The host field of a known_hosts line, as ssh and paramiko look it up."""
    return target.hostname if target.port == 22 else f"[{target.hostname}]:{target.port}"


def accept_hint(name: str) -> str:
    return f"if the VM was reinstalled, accept its new key with `invoke keyscan --vm {name} --accept-changed`"


def host_key_hint(target: Target, changed: bool) -> str:
    """What to do about a physical host's unknown or changed key: `invoke keyscan` records VMs' keys only."""
    ssh = command("ssh", *(["-F", str(target.ssh_config)] if target.ssh_config else []), target.name)
    if not changed:
        return f"connect once with `{ssh}`, check the key's fingerprint and accept it"
    return (f"if the host was reinstalled, remove its old key with"
            f" `{command('ssh-keygen', '-f', target.known_hosts, '-R', known_hosts_name(target))}`, then connect once"
            f" with `{ssh}` and check the new key's fingerprint")


def connect(target: Target, timeout: int = 20, physical_host: bool = False) -> Connection:
    """An open connection to ``target`` (a VM; with ``physical_host``, a host of site.toml, whose key is the admin's
    to accept: errors say how), host key checked against its known_hosts."""
    kwargs: dict[str, object] = {"look_for_keys": not target.identity_files, "allow_agent": True}
    if target.identity_files:
        kwargs["key_filename"] = list(target.identity_files)
    config = Config(overrides={"load_ssh_configs": False})
    conn = Connection(target.hostname, user=target.user, port=target.port, config=config,
                      connect_kwargs=kwargs, connect_timeout=timeout)
    conn.client.set_missing_host_key_policy(RejectPolicy())
    if os.path.exists(target.known_hosts):
        conn.client.load_host_keys(target.known_hosts)
    try:
        conn.open()
    except (SSHException, OSError) as err:
        # A refusal after the handshake (host key, authentication) leaves paramiko's transport running: its
        # thread and socket would stay until the process exits, one per VM that failed.
        conn.client.close()
        raise _open_failure(target, err, physical_host) from None
    return conn


def _open_failure(target: Target, err: SSHException | OSError, physical_host: bool) -> RemoteError:
    if isinstance(err, BadHostKeyException):
        hint = host_key_hint(target, changed=True) if physical_host else accept_hint(target.name)
        return RemoteError(f"{target.name}: its SSH host key CHANGED (known_hosts {target.known_hosts});"
                           f" refusing to connect. {hint}")
    if isinstance(err, SSHException):
        if "not found in known_hosts" in str(err):
            hint = host_key_hint(target, changed=False) if physical_host else \
                f"record it with `invoke keyscan --vm {target.name}`"
            return RemoteError(f"{target.name}: host key unknown (not in {target.known_hosts}): {hint}")
        return RemoteError(f"{target.name}: ssh to {target.user}@{target.hostname}:{target.port}: {_ssh_failure(err)}")
    return RemoteError(f"{target.name}: ssh to {target.hostname}:{target.port}: {err}")


def _ssh_failure(err: SSHException) -> str:
    text = str(err)
    if not text.startswith(_NO_BANNER):
        return text
    # The connection closed, or nothing came within the banner timeout; paramiko glues on the cause, if any,
    # without a space ("...banner[Errno 104] Connection reset by peer").
    cause = text.removeprefix(_NO_BANNER).strip()
    return (f"no SSH banner came back{f' ({cause})' if cause else ''}: the machine may still be booting, or another"
            " service than sshd listens on that port")


# What a command or an SFTP transfer on an open connection raises when its session fails midway: a channel the
# server refused, a session that dropped (paramiko's SSHException is no OSError), a socket or stream that closed.
SESSION_ERRORS = (SSHException, OSError, EOFError)


def session_failure(err: BaseException) -> str:
    """One line for one of SESSION_ERRORS, for a report."""
    if isinstance(err, ChannelException):
        return f"the SSH server refused to open a session ({err.text})"
    return f"{type(err).__name__}: {err}"


def command(*args: str) -> str:
    """One remote command line from words; every word quoted, so no name or path is ever shell syntax."""
    return " ".join(shlex.quote(a) for a in args)


def script(body: str, *args: str) -> str:
    """A fixed shell script run with ``sh -c`` and data passed as positional parameters, never spliced in."""
    return command("sh", "-c", body, "kvmconf", *args)


def run(conn: Connection, line: str) -> Result:
    # stdin is /dev/null, so a command that asks (a dpkg conffile prompt, ssh-keygen over an existing key, a read in
    # a hook) reads its end at once: with in_stream=False, Fabric leaves the remote stdin open, never closed, and
    # such a command waited forever, the deploy with it.
    result = conn.run(f"exec </dev/null; {line}", hide=True, warn=True, in_stream=False)
    assert result is not None
    return result
