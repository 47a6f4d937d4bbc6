"""`invoke keyscan`: record each VM's SSH host keys in the known_hosts file the generated ssh config names.

A key seen for the first time is added; a key that differs from the recorded one is an error naming the VM
(a reinstalled VM, or someone in the middle) unless the admin accepts it explicitly. One VM that cannot be
scanned does not stop the others: theirs are recorded, and the run then fails naming every VM that failed.
The VMs are scanned at the same time (ssh-keyscan waits up to 40 s for one that does not answer), and reported and
recorded in the order asked for.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from generators.files import replace_text
from kvmconf.errors import KvmconfError
from kvmconf.remote import Target, accept_hint, known_hosts_name, resolve

KEY_TYPES = "ed25519,ecdsa,rsa"
# ssh-keyscan processes at a time: each is one short TCP exchange, or a wait on a VM that is down.
PARALLEL = 16


class HostKeyChanged(KvmconfError):
    """A VM presents a host key that differs from the recorded one."""


class KeyscanFailed(KvmconfError):
    """Some VMs' keys could not be recorded (unreachable, or a key changed); the other VMs' keys were."""


def scan(target: Target, timeout: int = 10) -> list[tuple[str, str]]:
    """(key type, base64 key) pairs the VM offers."""
    try:
        proc = subprocess.run(["ssh-keyscan", "-T", str(timeout), "-t", KEY_TYPES, "-p", str(target.port), "--",
                               target.hostname], capture_output=True, text=True, check=False, timeout=timeout * 4)
    except subprocess.TimeoutExpired:
        raise KvmconfError(f"{target.name}: no host key from {target.hostname}:{target.port} (ssh-keyscan still"
                           f" waiting after {timeout * 4} s)") from None
    keys = []
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            keys.append((fields[1], fields[2]))
    if not keys:
        raise KvmconfError(f"{target.name}: no host key from {target.hostname}:{target.port}"
                           f" ({proc.stderr.strip() or 'no answer'})")
    return sorted(keys)


def _read(path: str) -> list[str]:
    return Path(path).read_text().splitlines() if os.path.exists(path) else []


def keyscan(names: Sequence[str], ssh_config: Path, accept_changed: bool = False,
            progress: Callable[[str], None] = lambda line: None) -> list[str]:
    """Scan the VMs and update their known_hosts file(s); returns one line per VM, given to `progress` as it goes.

    Raises KeyscanFailed at the end, naming every VM that could not be scanned or whose key changed, once the
    keys of all the others are written.
    """
    messages: list[str] = []
    files: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=min(PARALLEL, max(len(names), 1)), thread_name_prefix="keyscan")
    try:
        scans = [pool.submit(_scan, name, ssh_config) for name in names]
        for name, scanned in zip(names, scans, strict=True):
            try:
                message = _record(name, *scanned.result(), files, accept_changed)
            except KvmconfError as err:
                failed[name] = str(err).removeprefix(f"{name}: ")
                message = f"{name}: FAILED: {failed[name]}"
            messages.append(message)
            progress(message)
    finally:  # also on Ctrl-C: what was scanned so far is kept, and no scan not yet started starts
        pool.shutdown(wait=False, cancel_futures=True)
        for path, lines in files.items():
            _write(path, lines)
    if failed:
        raise KeyscanFailed(f"keyscan FAILED for {len(failed)} of {len(names)} VM(s), their keys not recorded:"
                            f" {', '.join(failed)}\n" + "\n".join(f"  {name}: {why}" for name, why in failed.items()))
    return messages


def _scan(name: str, ssh_config: Path) -> tuple[Target, list[tuple[str, str]]]:
    target = resolve(name, ssh_config)
    return target, scan(target)


def _record(name: str, target: Target, offered: list[tuple[str, str]], files: dict[str, list[str]],
            accept_changed: bool) -> str:
    """Update the VM's known_hosts lines in `files` with the keys it offered; the message says what changed."""
    lines = files.setdefault(target.known_hosts, _read(target.known_hosts))
    host = known_hosts_name(target)
    recorded = {(f[1], f[2]) for f in (line.split() for line in lines) if len(f) >= 3 and host in f[0].split(",")}
    recorded_types = {t for t, _ in recorded}
    differs = [(t, k) for t, k in offered if t in recorded_types and (t, k) not in recorded]
    if differs and not accept_changed:
        raise HostKeyChanged(f"{name}: host key ({', '.join(t for t, _ in differs)}) of {host} CHANGED since it was"
                             f" recorded in {target.known_hosts}; {accept_hint(name)}")
    if set(offered) <= recorded:
        return f"{name}: known"
    kept = [line for line in lines if host not in (line.split() or [""])[0].split(",")] if differs else lines
    files[target.known_hosts] = kept + [f"{host} {t} {k}" for t, k in offered if differs or (t, k) not in recorded]
    return f"{name}: {'replaced changed' if differs else 'recorded'} key(s) of {host}"


def _write(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    replace_text(Path(path), "".join(f"{line}\n" for line in lines))
