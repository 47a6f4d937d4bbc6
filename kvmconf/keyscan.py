"""`invoke keyscan`: record each VM's SSH host keys in the known_hosts file the generated ssh config names.

A key seen for the first time is added; a key that differs from the recorded one is an error naming the VM
(a reinstalled VM, or someone in the middle) unless the admin accepts it explicitly.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kvmconf.errors import KvmconfError
from kvmconf.files import replace_text
from kvmconf.remote import Target, accept_hint, known_hosts_name, resolve

KEY_TYPES = "ed25519,ecdsa,rsa"


class HostKeyChanged(KvmconfError):
    """A VM presents a host key that differs from the recorded one."""


def scan(target: Target, timeout: int = 10) -> list[tuple[str, str]]:
    """(key type, base64 key) pairs the VM offers."""
    proc = subprocess.run(["ssh-keyscan", "-T", str(timeout), "-t", KEY_TYPES, "-p", str(target.port), "--",
                           target.hostname], capture_output=True, text=True, check=False, timeout=timeout * 4)
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


def keyscan(names: Sequence[str], ssh_config: Path, accept_changed: bool = False) -> list[str]:
    """Scan the VMs and update their known_hosts file(s); returns one message per VM."""
    messages: list[str] = []
    files: dict[str, list[str]] = {}
    changed: list[str] = []
    for name in names:
        target = resolve(name, ssh_config)
        lines = files.setdefault(target.known_hosts, _read(target.known_hosts))
        host = known_hosts_name(target)
        recorded = {(f[1], f[2]) for f in (line.split() for line in lines) if len(f) >= 3 and host in f[0].split(",")}
        offered = scan(target)
        recorded_types = {t for t, _ in recorded}
        differs = [(t, k) for t, k in offered if t in recorded_types and (t, k) not in recorded]
        if differs and not accept_changed:
            changed.append(f"{name}: host key ({', '.join(t for t, _ in differs)}) of {host} CHANGED since it was"
                           f" recorded in {target.known_hosts}; {accept_hint(name)}")
            continue
        if set(offered) <= recorded:
            messages.append(f"{name}: known")
            continue
        kept = [line for line in lines if host not in (line.split() or [""])[0].split(",")] if differs else lines
        files[target.known_hosts] = kept + [f"{host} {t} {k}" for t, k in offered if differs or (t, k) not in recorded]
        messages.append(f"{name}: {'replaced changed' if differs else 'recorded'} key(s) of {host}")
    for path, lines in files.items():
        _write(path, lines)
    if changed:
        raise HostKeyChanged("\n".join(changed))
    return messages


def _write(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    replace_text(Path(path), "".join(f"{line}\n" for line in lines), mode=0o644)
