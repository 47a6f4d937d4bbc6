"""NoCloud seeds for install=cloud VMs: cloud-init/<vm>/{user-data,meta-data,network-config} and <vm>.iso.

The three files are also served over HTTP (<http_url>/cloud-init/<vm>/) for `ds=nocloud;s=...`; the ISO
(volume id `cidata`) is what a cloud-image VM boots with as a second CD-ROM.

Accounts: the admin user gets the SSH keys and password-less sudo, its password locked unless
site.toml gives a crypt hash (plain text never reaches a seed: site.py refuses it). Root logs in with
the keys only when accounts.ssh_user is root (that is who `ssh <vm>` logs in as); otherwise
disable_root stays on. A root hash, when given, is set through chpasswd as a hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from generators.dnsmasq import dns_servers
from generators.model import Accounts, Cluster, Install, Vm
from generators.nocloud_iso import seed_iso
from generators.render import banner_lines, environment

USER_DATA = "user-data.yaml.j2"
META_DATA = "meta-data.yaml.j2"
NETWORK_CONFIG = "network-config.yaml.j2"
LOCKED = "!"


def _hash_or_none(value: str) -> str | None:
    return None if value == LOCKED else value


def created_login_user(accounts: Accounts) -> str | None:
    """accounts.ssh_user when it is neither root nor admin_user: `ssh <vm>` logs in as it, so every install
    (this seed, the preseed) creates it, with the keys, no password and password-less sudo."""
    return None if accounts.ssh_user in ("root", accounts.admin_user) else accounts.ssh_user


def _users(accounts: Accounts) -> list[dict[str, str | None]]:
    users = [{"name": accounts.admin_user, "password_hash": _hash_or_none(accounts.admin_password_hash)}]
    if login_user := created_login_user(accounts):
        users.append({"name": login_user, "password_hash": None})
    return users


def _quoted(value: str | None) -> str | None:
    return None if value is None else json.dumps(value)


def quoted_site_values(cluster: Cluster) -> dict[str, Any]:
    """Site-wide free-form strings as JSON strings (valid YAML scalars), quoted once, not once per VM."""
    site = cluster.site
    accounts = site.accounts
    return {
        "users": [{key: _quoted(value) for key, value in user.items()} for user in _users(accounts)],
        "ssh_keys": [json.dumps(key) for key in accounts.ssh_keys],
        "root_password_hash": _quoted(_hash_or_none(accounts.root_password_hash)),
        "timezone": json.dumps(site.timezone),
        "locale": json.dumps(site.locale),
        "mirror_proxy": _quoted(site.provision.mirror_proxy or None),
    }


def instance_id(vm: Vm, user_data: str, network_config: str) -> str:
    """`<name>-<12 hex>`: a new id whenever the seed's content changes, so cloud-init runs it again.

    A new id makes cloud-init treat the VM as a new instance (new SSH host keys, with Debian's defaults),
    so the seeds' banners name the inputs by file name: the id must not change with the way the path to
    cluster.conf was written (`invoke plan` would then want to replace every seed ISO). The caller hashes
    the seed as the usual file names render it (see _as_usually_named).
    """
    digest = hashlib.sha256(user_data.encode() + b"\0" + network_config.encode()).hexdigest()
    return f"{vm.name}-{digest[:12]}"


def _as_usually_named(cluster: Cluster) -> Callable[[str], str]:
    """A seed's text as it reads when the inputs are called cluster.conf and site.toml: renaming them (prod.conf)
    changes the banners, which must not give every cloud VM a new instance-id, and new host keys, at its next boot.
    """
    usual = replace(cluster, source="cluster.conf", site=replace(cluster.site, path="site.toml"))
    renamed = [(given, line) for template in (USER_DATA, NETWORK_CONFIG)
               for given, line in zip(banner_lines(cluster, template, by_name=True),
                                      banner_lines(usual, template, by_name=True), strict=True) if given != line]

    def text(seed: str) -> str:
        for given, line in renamed:
            seed = seed.replace(given, line, 1)
        return seed
    return text


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    env = environment()
    user_data_template, meta_data_template, network_config_template = (
        env.get_template(name) for name in (USER_DATA, META_DATA, NETWORK_CONFIG))
    site = cluster.site

    def seed_context(template: str) -> dict[str, Any]:  # the banner by file name: see instance_id
        return {"cluster": cluster, "site": site, "banner": banner_lines(cluster, template, by_name=True)}

    user_data_context = {**seed_context(USER_DATA), "q": quoted_site_values(cluster),
                         "root_login": site.accounts.ssh_user == "root"}
    meta_data_context, network_config_context = seed_context(META_DATA), seed_context(NETWORK_CONFIG)
    usually_named = _as_usually_named(cluster)
    tree: dict[PurePosixPath, str | bytes] = {}
    for vm in cluster.vms:
        if vm.install is not Install.CLOUD:
            continue
        user_data = user_data_template.render(user_data_context, vm=vm, fqdn=cluster.fqdn(vm))
        network = cluster.network_of(vm)
        network_config = network_config_template.render(network_config_context, vm=vm, network=network,
                                                        nameservers=dns_servers(cluster, network))
        meta_data = meta_data_template.render(meta_data_context, vm=vm,
                                              instance_id=instance_id(vm, usually_named(user_data),
                                                                      usually_named(network_config)))
        seed = f"cloud-init/{vm.name}"
        tree[PurePosixPath(f"{seed}/user-data")] = user_data
        tree[PurePosixPath(f"{seed}/meta-data")] = meta_data
        tree[PurePosixPath(f"{seed}/network-config")] = network_config
        tree[PurePosixPath(f"{seed}.iso")] = seed_iso(user_data.encode(), meta_data.encode(), network_config.encode())
    return tree
