"""site.toml's [accounts]: the users every VM gets, their password hashes and SSH keys, and the secrets file.

The hashes and keys may live in a secrets file (``[accounts] secrets``) kept out of version control; its values
replace site.toml's, and a problem with one of them points at the secrets file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from generators.errors import ConfigError, UsageError, shown
from generators.toml_reader import TableReader, locator, read_toml

_CRYPT_HASH = re.compile(r"!|\$(6|y|gy|7)\$[./A-Za-z0-9$=,]+")
_SSH_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/=]+( .*)?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# Debian's system accounts (base-passwd): the installer refuses them as the first user, and cloud-init would turn
# one into the admin account.
SYSTEM_USERS = frozenset({"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
                          "proxy", "www-data", "backup", "list", "irc", "gnats", "_apt", "nobody"})
_SECRET_KEYS = (("root_password_hash", str), ("admin_password_hash", str), ("ssh_keys", list))


def read_accounts(top: TableReader, site_dir: Path) -> dict[str, Any]:
    """The values of model.Accounts (ssh_keys still a list); a value with a problem is None."""
    a = top.sub("accounts")
    secrets_name = a.get("secrets", str, None, "the secrets file's name, relative to site.toml")
    values: dict[str, Any] = dict(
        root_password_hash=a.get("root_password_hash", str, "!"),
        admin_user=a.get("admin_user", str, what="the name of the admin user created on every VM"),
        admin_password_hash=a.get("admin_password_hash", str, "!"),
        ssh_keys=a.get("ssh_keys", list, [], "a list of SSH public keys"),
        ssh_user=a.get("ssh_user", str, "root"),
    )
    readers = dict.fromkeys(values, a)  # where a problem with each value is: site.toml or the secrets file
    if secrets_name:
        secrets = _load_secrets(site_dir / secrets_name, a)
        if secrets is not None:
            secret_values, secret_reader = secrets
            values.update(secret_values)
            readers.update(dict.fromkeys(secret_values, secret_reader))
    _check_password_hashes(values, readers)
    _check_ssh_keys(values, readers["ssh_keys"])
    _check_user_names(values, a)
    a.check_unknown()
    return values


def _load_secrets(path: Path, accounts: TableReader) -> tuple[dict[str, Any], TableReader] | None:
    """Values of [accounts] kept out of version control; a missing file keeps site.toml's values."""
    if not path.exists():
        return None
    try:
        data, text = read_toml(path, "the secrets file")
    except ConfigError as err:
        accounts.problems.extend(err.problems)
        return None
    except UsageError as err:  # a directory, unreadable: a mistake in site.toml's secrets key
        accounts.problem("secrets", f"{str(err).removeprefix(f'{path}: ')} (expected a TOML file with an"
                         " [accounts] table, or no file)")
        return None
    top = TableReader(data, "", locator(str(path), text), accounts.problems, one_line=True)
    a = top.sub("accounts")
    values = {}
    for key, kind in _SECRET_KEYS:
        a.used.add(key)
        if key in a.data and (value := a.get(key, kind)) is not None:
            values[key] = value
    a.check_unknown()
    top.check_unknown()
    return values, a


def _check_password_hashes(values: dict[str, Any], readers: dict[str, TableReader]) -> None:
    for key in ("root_password_hash", "admin_password_hash"):
        value = values[key]
        if value is not None and not _CRYPT_HASH.fullmatch(value):
            readers[key].problem(key, "is not a crypt(3) hash (expected a SHA-512 '$6$...' or yescrypt '$y$...'"
                                 " hash, e.g. from mkpasswd -m sha-512, or '!' for a locked account; plain text"
                                 " is refused)")
            values[key] = None


def _check_ssh_keys(values: dict[str, Any], reader: TableReader) -> None:
    for key in values["ssh_keys"] or ():
        if not isinstance(key, str) or not _SSH_KEY.fullmatch(key):
            reader.problem("ssh_keys", f"{shown(key, 40)} is not an SSH public key (expected"
                           " 'ssh-ed25519 AAAA... comment')")
            values["ssh_keys"] = None


def _check_user_names(values: dict[str, Any], a: TableReader) -> None:
    for key in ("admin_user", "ssh_user"):  # names in useradd, cloud-init and ssh's User lines
        user = values[key]
        if user is not None and not _USER.fullmatch(user):
            a.problem(key, f"{shown(user)} is not a user name (expected up to 32 lowercase letters, digits, '_', '-',"
                      " not starting with a digit or '-')")
            values[key] = None
    admin_user = values["admin_user"]
    if admin_user in SYSTEM_USERS:  # ssh_user may well be root: it logs in, it is not created
        a.problem("admin_user", f"{shown(admin_user)} is a system account of Debian, which the installer refuses as"
                  f" the user it creates (expected another name than {', '.join(sorted(SYSTEM_USERS))})")
        values["admin_user"] = None
