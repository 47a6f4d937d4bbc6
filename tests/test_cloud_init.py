"""cloud-init NoCloud seeds: content, golden files, the seed ISO, and cloud-init's own checks."""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pycdlib
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from generators import cloud_init, nocloud_iso
from generators.model import Cluster, Install
from tests.golden import assert_golden
from tests.tools import require_tool, run
from tests.unique_yaml import UniqueKeyLoader

FILES = ("user-data", "meta-data", "network-config")
ROOT_HASH = "$6$rounds=656000$saltsalt$" + "A" * 86
ADMIN_HASH = "$y$j9T$salt$" + "b" * 43
ODD_KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFvq3ekr8hCxWn5tLCX6TfvWO5w8VFtOr3kRxK9Vp3m it\'s "me" \\o/ #1: yes'


def with_accounts(cluster: Cluster, **changes: Any) -> Cluster:
    site = cluster.site
    return replace(cluster, site=replace(site, accounts=replace(site.accounts, **changes)))


def seed_files(tree: dict[PurePosixPath, str | bytes], vm: str) -> dict[str, str]:
    files = {name: tree[PurePosixPath("cloud-init", vm, name)] for name in FILES}
    assert all(isinstance(text, str) for text in files.values())
    return {name: str(text) for name, text in files.items()}


def cloud_vms(cluster: Cluster) -> list[str]:
    return [vm.name for vm in cluster.vms if vm.install is Install.CLOUD]


def write_tree(tree: dict[PurePosixPath, str | bytes], root: Path) -> None:
    for path, content in tree.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content.encode() if isinstance(content, str) else content)


# Variants that take every branch of the user-data template (hashes, non-root ssh user, apt proxy).
def variants(example: Cluster) -> dict[str, Cluster]:
    proxied = replace(example, site=replace(example.site, provision=replace(
        example.site.provision, mirror_proxy="http://192.168.50.2:3142")))
    return {
        "example": example,
        "hashes": with_accounts(example, root_password_hash=ROOT_HASH, admin_password_hash=ADMIN_HASH),
        "ssh-as-ops": with_accounts(example, ssh_user="ops"),
        "ssh-as-admin": with_accounts(example, ssh_user="admin"),
        "proxy": proxied,
        "odd-key-comment": with_accounts(example, ssh_keys=(ODD_KEY,)),
        # site.toml may leave ssh_keys out: an empty key list must not become `ssh_authorized_keys: null`.
        "no-keys": with_accounts(example, ssh_keys=()),
        "no-keys-ssh-as-ops": with_accounts(example, ssh_keys=(), ssh_user="ops"),
    }


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("cloud_init", cloud_init.render(example), regenerate)


def test_the_unique_key_loader_refuses_a_duplicate_key() -> None:
    """Control for the test below: without it, that test could pass on a loader that sees no duplicates."""
    assert yaml.load("a: 1\nb: {c: 2}\n", UniqueKeyLoader) == {"a": 1, "b": {"c": 2}}
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate key 'disable_root'\n.*line 3, column 1"):
        yaml.load("disable_root: false\nusers: []\ndisable_root: true\n", UniqueKeyLoader)
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate key 'name'\n.*line 3, column 5"):
        yaml.load("users:\n  - {name: a,\n    name: b}\n", UniqueKeyLoader)


def test_no_seed_file_has_a_duplicate_key(example: Cluster) -> None:
    """cloud-init would act on the last of two equal keys only, so a duplicate is a setting silently lost."""
    for variant, cluster in variants(example).items():
        tree = cloud_init.render(cluster)
        for vm in cloud_vms(cluster):
            for name, text in seed_files(tree, vm).items():
                assert isinstance(yaml.load(text, UniqueKeyLoader), dict), (variant, vm, name)


def test_each_top_level_user_data_key_is_written_once_in_the_template() -> None:
    """Branches pick values, not whole keys: a key written in several branches can end up twice in one file."""
    source = (Path("templates") / cloud_init.USER_DATA).read_text()
    keys = [line.split(":")[0] for line in source.splitlines() if re.match(r"[a-z_]+:", line)]
    assert "disable_root" in keys and "ssh_authorized_keys" in keys
    assert sorted(key for key in set(keys) if keys.count(key) > 1) == []


def test_seeds_only_for_install_cloud_vms(example: Cluster) -> None:
    tree = cloud_init.render(example)
    assert cloud_vms(example) == ["provision", "login"]
    expected = {PurePosixPath("cloud-init", vm, name) for vm in ("provision", "login") for name in FILES}
    expected |= {PurePosixPath("cloud-init", f"{vm}.iso") for vm in ("provision", "login")}
    assert set(tree) == expected


def test_user_data_is_cloud_config_then_banner(example: Cluster) -> None:
    lines = seed_files(cloud_init.render(example), "login")["user-data"].splitlines()
    assert lines[0] == "#cloud-config"
    assert lines[1].startswith("# Generated by kvmconf from cluster.conf and site.toml with templates/user-data")
    assert lines[2] == "# Do not edit: change those files and run `make` again."


def test_user_data_content(example: Cluster) -> None:
    data = yaml.safe_load(seed_files(cloud_init.render(example), "login")["user-data"])
    keys = list(example.site.accounts.ssh_keys)
    assert data["hostname"] == "login"
    assert data["fqdn"] == "login.phys.example.org"
    assert data["manage_etc_hosts"] is True
    assert data["users"] == [{"name": "admin", "shell": "/bin/bash", "sudo": "ALL=(ALL) NOPASSWD:ALL",
                              "lock_passwd": True, "ssh_authorized_keys": keys}]
    # The example's ssh_user is root: root needs the keys, so root login stays enabled.
    assert data["disable_root"] is False
    assert data["ssh_authorized_keys"] == keys
    assert data["ssh_pwauth"] is False
    assert "chpasswd" not in data
    assert data["timezone"] == "Europe/Berlin"
    assert data["locale"] == "en_US.UTF-8"
    assert data["packages"] == ["openssh-server", "python3", "qemu-guest-agent"]
    assert data["runcmd"] == [["systemctl", "enable", "--now", "qemu-guest-agent"]]


def test_password_hashes_are_set_as_hashes(example: Cluster) -> None:
    text = seed_files(cloud_init.render(variants(example)["hashes"]), "login")["user-data"]
    data = yaml.safe_load(text)
    admin = data["users"][0]
    assert admin["lock_passwd"] is False
    assert admin["passwd"] == ADMIN_HASH
    # sudo asks for that password, as on PXE-installed VMs (the preseed gives NOPASSWD to a locked admin only)
    assert admin["sudo"] == "ALL=(ALL) ALL"
    assert data["chpasswd"] == {"expire": False, "users": [{"name": "root", "password": ROOT_HASH, "type": "hash"}]}
    assert "plain_text_passwd" not in text


def test_root_login_disabled_unless_ssh_user_is_root(example: Cluster) -> None:
    for name, created in (("ssh-as-admin", ["admin"]), ("ssh-as-ops", ["admin", "ops"])):
        data = yaml.safe_load(seed_files(cloud_init.render(variants(example)[name]), "login")["user-data"])
        assert data["disable_root"] is True, name
        assert "ssh_authorized_keys" not in data, name  # top-level keys would also go to root
        assert [user["name"] for user in data["users"]] == created
        assert all(user["ssh_authorized_keys"] == list(example.site.accounts.ssh_keys) for user in data["users"])


def test_free_form_values_survive_yaml_quoting(example: Cluster) -> None:
    data = yaml.safe_load(seed_files(cloud_init.render(variants(example)["odd-key-comment"]), "login")["user-data"])
    assert data["users"][0]["ssh_authorized_keys"] == [ODD_KEY]
    assert data["ssh_authorized_keys"] == [ODD_KEY]


def test_no_ssh_keys_means_no_key_lists(example: Cluster) -> None:
    for name, created in (("no-keys", ["admin"]), ("no-keys-ssh-as-ops", ["admin", "ops"])):
        data = yaml.safe_load(seed_files(cloud_init.render(variants(example)[name]), "login")["user-data"])
        assert [user["name"] for user in data["users"]] == created, name
        assert "ssh_authorized_keys" not in data, name
        assert all("ssh_authorized_keys" not in user for user in data["users"]), name
        assert data["disable_root"] is (name != "no-keys"), name


def test_apt_proxy_when_the_site_has_one(example: Cluster) -> None:
    data = yaml.safe_load(seed_files(cloud_init.render(variants(example)["proxy"]), "login")["user-data"])
    assert data["apt"] == {"proxy": "http://192.168.50.2:3142"}


def test_meta_data_and_network_config(example: Cluster) -> None:
    files = seed_files(cloud_init.render(example), "login")
    meta = yaml.safe_load(files["meta-data"])
    assert meta["local-hostname"] == "login"
    assert meta["instance-id"] == cloud_init.instance_id(example.vm("login"), files["user-data"],
                                                         files["network-config"])
    assert meta["instance-id"].startswith("login-") and len(meta["instance-id"]) == len("login-") + 12
    network = yaml.safe_load(files["network-config"])
    assert network == {"version": 2, "ethernets": {"primary": {
        "match": {"macaddress": "52:54:00:60:00:10"},
        "addresses": ["192.168.60.10/24"],
        "routes": [{"to": "0.0.0.0/0", "via": "192.168.60.1"}],
        "nameservers": {"addresses": ["192.168.50.2"], "search": ["phys.example.org"]},
    }}}


def test_instance_id_changes_with_the_seed_and_only_then(example: Cluster) -> None:
    def ids(cluster: Cluster) -> dict[str, str]:
        tree = cloud_init.render(cluster)
        return {vm: yaml.safe_load(seed_files(tree, vm)["meta-data"])["instance-id"] for vm in cloud_vms(cluster)}

    first = ids(example)
    assert ids(example) == first
    changed = ids(with_accounts(example, ssh_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA other@host",)))
    assert all(changed[vm] != first[vm] for vm in first)
    moved = replace(example, vms=tuple(replace(vm, ip=vm.ip + 100) if vm.name == "login" else vm
                                       for vm in example.vms))
    after_move = ids(moved)
    assert after_move["login"] != first["login"]  # network-config changed
    assert after_move["provision"] == first["provision"]


def test_a_seed_is_the_same_however_the_inputs_paths_are_written(example: Cluster) -> None:
    """plan compares seed ISOs byte for byte, and a new instance-id makes cloud-init treat the VM as new."""
    seeds = cloud_init.render(example)
    written = (("./cluster.conf", "./site.toml"), ("/root/kvmconf/cluster.conf", f"{Path.cwd()}/site.toml"),
               ("../kvmconf/cluster.conf", "site.toml"))
    for source, site_path in written:
        written_otherwise = replace(example, source=source, site=replace(example.site, path=site_path))
        assert cloud_init.render(written_otherwise) == seeds, source
    assert "# Generated by kvmconf from cluster.conf and site.toml with templates/user-data.yaml.j2." in \
        str(seeds[PurePosixPath("cloud-init/login/user-data")])


def test_renaming_the_inputs_keeps_every_instance_id(example: Cluster) -> None:
    """The banner names the inputs' files, so a seed named prod.conf differs (plan replaces the ISO): its
    instance-id must not, or cloud-init takes the VM for a new one at its next boot and makes new host keys."""
    seeds = cloud_init.render(example)
    renamed = cloud_init.render(replace(example, source="/srv/prod.conf", site=replace(example.site, path="prod.toml")))
    for vm in cloud_vms(example):
        given, usual = seed_files(renamed, vm), seed_files(seeds, vm)
        assert "# Generated by kvmconf from prod.conf and prod.toml with" in given["user-data"]
        assert yaml.safe_load(given["meta-data"]) == yaml.safe_load(usual["meta-data"]), vm


# --- the seed ISO ---------------------------------------------------------------------------------

def read_iso(image: bytes) -> tuple[str, dict[str, dict[str, bytes]]]:
    """The volume id, and each file's content by the name it has in each of the three namespaces."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        volume_id = iso.pvd.volume_identifier.decode().rstrip()
        found: dict[str, dict[str, bytes]] = {}
        for name in FILES:
            by_kind = {}
            for kind, path in (("rr_path", f"/{name}"), ("joliet_path", f"/{name}"),
                               ("iso_path", "/" + name.upper().replace("-", "_") + ".;1")):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: path})
                by_kind[kind] = out.getvalue()
            found[name] = by_kind
        rr_names = [child.rock_ridge.name().decode() for child in iso.list_children(rr_path="/") if child.is_file()]
        assert sorted(rr_names) == sorted(FILES)
    finally:
        iso.close()
    return volume_id, found


def test_every_iso_holds_the_three_files_with_volume_id_cidata(example: Cluster) -> None:
    for cluster in variants(example).values():
        tree = cloud_init.render(cluster)
        for vm in cloud_vms(cluster):
            image = tree[PurePosixPath("cloud-init", f"{vm}.iso")]
            assert isinstance(image, bytes)
            volume_id, found = read_iso(image)
            assert volume_id == "cidata"
            for name, text in seed_files(tree, vm).items():
                assert found[name] == dict.fromkeys(("rr_path", "joliet_path", "iso_path"), text.encode()), name


def test_iso_is_the_same_whatever_the_clock_and_time_zone(example: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = [b"#cloud-config\n", b"instance-id: a\n", b"version: 2\n"]
    ours, plain = [], []
    for now, zone in ((1_700_000_000.0, "UTC"), (1_900_000_123.0, "Asia/Kolkata")):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        nocloud_iso._skeleton.cache_clear()  # build from scratch, not from the cached skeleton
        ours.append((nocloud_iso.seed_iso(*contents), nocloud_iso.pycdlib_image(contents)[0],
                     cloud_init.render(example)))
        # Control: without the frozen clock pycdlib stamps the (moved) time, so this test can fail.
        iso = pycdlib.PyCdlib()
        iso.new(vol_ident="cidata")
        out = io.BytesIO()
        iso.write_fp(out)
        plain.append(out.getvalue())
    monkeypatch.delenv("TZ")
    time.tzset()
    assert ours[0] == ours[1]
    assert plain[0] != plain[1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=5000), min_size=3, max_size=3))
def test_spliced_iso_equals_a_full_pycdlib_build(contents: list[bytes]) -> None:
    spliced = nocloud_iso.seed_iso(*contents)
    full, _ = nocloud_iso.pycdlib_image(contents)
    assert spliced == full


def test_pycdlib_runs_once_per_set_of_file_lengths() -> None:
    # The 10,000-VM bench: pycdlib costs ~0.7 ms an image, a spliced skeleton ~10 µs (bench/ measures it).
    nocloud_iso._skeleton.cache_clear()
    for i in range(500):
        nocloud_iso.seed_iso(b"#cloud-config\nhostname: vm%05d\n" % i, b"instance-id: vm%05d\n" % i, b"version: 2\n")
    assert nocloud_iso._skeleton.cache_info().misses == 1


# --- real consumers ------------------------------------------------------------------------------

@pytest.mark.consumer
def test_cloud_init_schema_accepts_every_user_data(example: Cluster, tmp_path: Path) -> None:
    cloud_init_tool = require_tool("cloud-init")
    for variant, cluster in variants(example).items():
        for vm in cloud_vms(cluster):
            path = tmp_path / f"{variant}-{vm}.user-data"
            path.write_text(seed_files(cloud_init.render(cluster), vm)["user-data"])
            result = run([cloud_init_tool, "schema", "--config-file", str(path)])
            assert result.returncode == 0, result.stdout + result.stderr
            # cloud-init 22.4 says "Valid cloud-config: <file>", later versions "Valid schema <file>".
            assert f"Valid cloud-config: {path}" in result.stdout or f"Valid schema {path}" in result.stdout, result
            assert "deprecat" not in (result.stdout + result.stderr).lower()


@pytest.mark.consumer
def test_cloud_init_schema_rejects_a_broken_user_data(tmp_path: Path) -> None:
    cloud_init_tool = require_tool("cloud-init")
    path = tmp_path / "user-data"
    path.write_text("#cloud-config\nusers: 5\n")
    result = run([cloud_init_tool, "schema", "--config-file", str(path)])
    assert result.returncode == 1
    assert "users: 5 is not of type" in result.stdout + result.stderr


@pytest.mark.consumer
def test_cloud_init_renders_every_network_config(example: Cluster, tmp_path: Path) -> None:
    cloud_init_tool = require_tool("cloud-init")
    tree = cloud_init.render(example)
    for vm in cloud_vms(example):
        source = tmp_path / f"{vm}.network-config"
        source.write_text(seed_files(tree, vm)["network-config"])
        out = tmp_path / vm
        result = run([cloud_init_tool, "devel", "net-convert", "-p", str(source), "-k", "yaml", "-d", str(out),
                      "-D", "debian", "-O", "eni"])
        assert result.returncode == 0, result.stderr
        assert "Wrote output format 'eni'" in result.stderr
        machine = example.vm(vm)
        network = example.network_of(machine)
        eni = (out / "etc/network/interfaces.d/50-cloud-init").read_text()
        assert f"address {machine.ip}/{network.subnet.prefixlen}" in eni
        assert f"route add default gw {network.gateway}" in eni
        assert "dns-nameservers 192.168.50.2" in eni and "dns-search phys.example.org" in eni
        assert machine.mac in (out / "etc/udev/rules.d/70-persistent-net.rules").read_text()


@pytest.mark.consumer
def test_xorriso_and_blkid_read_every_iso(example: Cluster, tmp_path: Path) -> None:
    xorriso = require_tool("xorriso")
    blkid = require_tool("blkid")
    tree = cloud_init.render(example)
    write_tree(tree, tmp_path / "build")
    for vm in cloud_vms(example):
        iso = tmp_path / "build" / "cloud-init" / f"{vm}.iso"
        info = run([xorriso, "-indev", str(iso), "-pvd_info"])
        assert info.returncode == 0, info.stderr
        assert "Volume Id    : cidata" in info.stdout
        extracted = tmp_path / "extracted" / vm
        result = run([xorriso, "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(extracted)])
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(extracted)) == sorted(FILES)
        for name, text in seed_files(tree, vm).items():
            assert (extracted / name).read_text() == text
        # cloud-init finds its seed with `blkid -t LABEL=cidata`.
        label = run([blkid, "-p", "-o", "export", str(iso)])
        assert label.returncode == 0, label.stderr
        assert "LABEL=cidata" in label.stdout.splitlines() and "TYPE=iso9660" in label.stdout.splitlines()


def test_a_network_without_dns_gets_the_provision_server_as_name_server(example: Cluster) -> None:
    """As in DHCP and the preseeds: a cloud VM must not come up with no name server at all."""
    site = example.site
    dmz = replace(site.networks["dmz"], dns_servers=())
    cluster = replace(example, site=replace(site, networks={**site.networks, "dmz": dmz}))
    assert cluster.vm("login").network == "dmz"
    network_config = yaml.safe_load(cloud_init.render(cluster)[PurePosixPath("cloud-init/login/network-config")])
    (ethernet,) = network_config["ethernets"].values()
    assert ethernet["nameservers"]["addresses"] == [str(site.provision.server)]
