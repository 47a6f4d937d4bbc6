"""Preseeds: golden files, the question whitelist, no plain-text password, partitions that fit the disk,
and `debconf-set-selections -c` on every variant with any output on stderr counted as a failure."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from generators import domain_xml, preseed
from generators.model import Boot, Cluster, Install, Vm
from generators.urls import installed_url
from tests.golden import assert_golden
from tests.tools import require_tool, run

CRYPT = re.compile(r"\$(6|y|gy|7)\$[./A-Za-z0-9$=,]+")
ROOT_HASH = "$6$kvmconfsalt$Yx0Ex6B0yS9Xd8yV6f4tI3bOJc8o1nq0G9m7WlCqzv9n3x1a0R8Ww9yX1yZbN5zC2kQ4qjT1f6vXy0aLbC7sd."
ADMIN_HASH = "$y$j9T$kvmconfsalt$4iH8n1WcUv3Q7r2mE5s0aLbC7sdYx0Ex6B0yS9Xd8yV"
ODD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOddKey0000000000000000000000000000000000000 it's $HOME; `x`"
LOGIN_USER = "deploy"  # accounts.ssh_user of the variant
ODD_HTTP_URL = "http://192.168.50.2/it's;$HOME"  # RFC 3986 allows ' ; $ in a path; site.toml takes it


def _answers(text: str) -> dict[str, tuple[str, str]]:
    """question -> (type, value), joined and split as debconf-set-selections does."""
    found = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        while line.endswith("\\"):
            index += 1
            line = line[:-1] + lines[index]
        index += 1
        if line.strip() and not line.startswith("#"):
            _, question, kind, *value = line.split(None, 3)
            found[question] = (kind, value[0] if value else "")
    return found


def _variant(example: Cluster) -> Cluster:
    """Everything the example does not exercise: password hashes, a proxy, an odd SSH key, a network
    without gateway and name servers, a small disk, install=pxe on both firmwares there, an ssh_user that is
    neither root nor the admin, and an http_url whose path holds characters the shell reads."""
    site = example.site
    dmz = dataclasses.replace(site.networks["dmz"], gateway=None, dns_servers=())
    accounts = dataclasses.replace(site.accounts, root_password_hash=ROOT_HASH, admin_password_hash=ADMIN_HASH,
                                   ssh_keys=(*site.accounts.ssh_keys, ODD_KEY), ssh_user=LOGIN_USER)
    provision = dataclasses.replace(site.provision, mirror_proxy="http://proxy.phys.example.org:3128/",
                                    http_url=ODD_HTTP_URL)
    site = dataclasses.replace(site, networks={**site.networks, "dmz": dmz}, accounts=accounts, provision=provision)
    login = dataclasses.replace(example.vm("login"), install=Install.PXE, boot=Boot.UEFI)
    tiny = dataclasses.replace(example.vm("ldap"), name="tiny", mac="52:54:00:50:00:77", disk=dataclasses.replace(
        example.vm("ldap").disk, size_gb=2), ram_mb=8192, line=99)
    vms = (*(login if vm.name == "login" else vm for vm in example.vms), tiny)
    return dataclasses.replace(example, site=site, vms=vms)


def _texts(cluster: Cluster) -> dict[PurePosixPath, str]:
    texts = {}
    for path, content in preseed.render(cluster).items():
        assert isinstance(content, str)
        texts[path] = content
    return texts


def _pxe_answers(cluster: Cluster) -> list[tuple[Vm, dict[str, tuple[str, str]]]]:
    """Each install=pxe VM with its preseed's answers, every preseed rendered once; never empty, so a
    test looping over it cannot pass by checking nothing."""
    texts = _texts(cluster)
    found = [(vm, _answers(texts[PurePosixPath(f"preseed/{vm.name}.cfg")]))
             for vm in cluster.vms if vm.install is Install.PXE]
    assert found, "the cluster has no install=pxe VM to check"
    return found


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("preseed", preseed.render(example), regenerate)


def test_one_preseed_per_pxe_vm(example: Cluster) -> None:
    expected = {PurePosixPath(f"preseed/{vm.name}.cfg") for vm in example.vms if vm.install is Install.PXE}
    assert set(preseed.render(example)) == expected
    assert len(expected) < len(example.vms)


@pytest.mark.parametrize("which", ["example", "variant"])
def test_every_question_is_whitelisted(example: Cluster, which: str) -> None:
    cluster = example if which == "example" else _variant(example)
    for path, text in _texts(cluster).items():
        assert preseed.lint(text) == [], path


def test_lint_catches_a_misspelt_question_a_wrong_type_and_a_repeat() -> None:
    text = ("d-i netcfg/get_hostnme string web\n"
            "d-i netcfg/confirm_static string true\n"
            "d-i time/zone string UTC\n"
            "d-i time/zone string \\\n    Europe/Berlin\n")
    assert preseed.lint(text) == [
        "line 1: d-i netcfg/get_hostnme is not a known installer question",
        "line 2: netcfg/confirm_static has type 'string' (expected 'boolean')",
        "line 4: time/zone is answered twice",
    ]


def test_no_password_in_clear(example: Cluster) -> None:
    for cluster in (example, _variant(example)):
        accounts = cluster.site.accounts
        for path, text in _texts(cluster).items():
            answers = _answers(text)
            passwords = {question: value for question, (kind, value) in answers.items() if kind == "password"}
            # Only the -crypted questions: the plain ones (passwd/root-password, ...) are not even whitelisted.
            assert set(passwords) <= {"passwd/root-password-crypted", "passwd/user-password-crypted"}, path
            for question, value in passwords.items():
                assert CRYPT.fullmatch(value) or value == "!", f"{path}: {question}"
            if accounts.root_password_hash == "!":
                assert answers["passwd/root-login"] == ("boolean", "false")
                assert "passwd/root-password-crypted" not in answers
            else:
                assert answers["passwd/root-password-crypted"] == ("password", accounts.root_password_hash)
            assert answers["passwd/user-password-crypted"] == ("password", accounts.admin_password_hash)


def test_static_network_from_the_vm_row(example: Cluster) -> None:
    cluster = _variant(example)
    for vm, answers in _pxe_answers(cluster):
        net = cluster.network_of(vm)
        assert answers["netcfg/disable_autoconfig"] == ("boolean", "true")
        assert answers["netcfg/get_ipaddress"][1] == str(vm.ip)
        assert answers["netcfg/get_netmask"][1] == str(net.netmask)
        assert answers["netcfg/get_gateway"][1] == (str(net.gateway) if net.gateway else "")
        assert ("netcfg/no_default_route" in answers) == (net.gateway is None)
        servers = [str(ip) for ip in net.dns_servers] or [str(cluster.site.provision.server)]
        assert answers["netcfg/get_nameservers"][1].split() == servers
        assert answers["netcfg/hostname"][1] == vm.name
        assert answers["netcfg/get_domain"][1] == cluster.site.domain
        assert answers["mirror/http/proxy"][1] == cluster.site.provision.mirror_proxy


def test_late_command_installs_the_keys_and_reports_the_install(example: Cluster) -> None:
    cluster = _variant(example)
    admin = cluster.site.accounts.admin_user
    for vm, answers in _pxe_answers(cluster):
        command = answers["preseed/late_command"][1]
        assert "\\" not in command
        words = shlex.split(command)  # the shell's reading, so quoting of an odd key comment is checked too
        for home, keys in [(f"home/{admin}", cluster.site.accounts.ssh_keys), (f"home/{LOGIN_USER}",
                           cluster.site.accounts.ssh_keys), ("root", ())]:  # ssh_user is not root: root gets none
            written = [words[i + 1] for i in range(len(words) - 3)
                       if words[i] == "echo" and words[i + 2] == ">>" and words[i + 3] == f"/target/{home}/.ssh/"
                       "authorized_keys"]
            assert written == list(keys)
        # the report is the last step and may fail: nothing depends on it being answered
        assert words[-11:] == ["{", "wget", "-q", "-Y", "off", "-O", "/dev/null", installed_url(cluster, vm),
                               "||", "true;", "}"]
        assert words[-4] == f"{cluster.site.provision.http_url}/installed/{vm.name}"


@pytest.mark.parametrize("report_answered", [True, False])
@pytest.mark.parametrize("which", ["example", "variant"])
def test_late_command_runs_in_a_real_shell(example: Cluster, tmp_path: Path, which: str,
                                           report_answered: bool) -> None:
    """The late_command under /bin/sh, with /target in tmp_path and stand-ins for in-target and wget."""
    cluster = example if which == "example" else _variant(example)
    accounts = cluster.site.accounts
    admin = accounts.admin_user
    login = [] if accounts.ssh_user in ("root", admin) else [accounts.ssh_user]  # the user the preseed creates
    assert login == ([] if which == "example" else [LOGIN_USER])
    root = ["root"] if accounts.ssh_user == "root" else []  # root gets the keys only when ssh logs in as root
    assert root == (["root"] if which == "example" else [])
    command = _answers(_texts(cluster)[PurePosixPath("preseed/ldap.cfg")])["preseed/late_command"][1]
    target, bin_dir, log = tmp_path / "target", tmp_path / "bin", tmp_path / "calls"
    for directory in ("root", f"home/{admin}", *(f"home/{user}" for user in login), "etc/sudoers.d"):
        (target / directory).mkdir(parents=True)
    bin_dir.mkdir()
    for tool in ("in-target", "wget"):
        status = 0 if tool == "in-target" or report_answered else 1  # an unanswered report must not fail
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit {status}\n')
        (bin_dir / tool).chmod(0o755)
    assert command.count("/target/") > 3
    result = run(["/bin/sh", "-c", command.replace("/target/", f"{target}/")],
                 env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert (result.returncode, result.stderr) == (0, "")
    for home in (*root, f"home/{admin}", *(f"home/{user}" for user in login)):
        assert (target / home / ".ssh/authorized_keys").read_text().splitlines() == list(accounts.ssh_keys)
        assert (target / home / ".ssh").stat().st_mode & 0o777 == 0o700
    assert root or not (target / "root/.ssh").exists()
    assert log.read_text().splitlines() == [
        *(f"in-target useradd --create-home --shell /bin/bash {user}" for user in login),
        *("in-target chown -R root:root /root/.ssh" for _ in root),
        f"in-target chown -R {admin}:{admin} /home/{admin}/.ssh",
        *(f"in-target chown -R {user}:{user} /home/{user}/.ssh" for user in login),
        f"in-target adduser {admin} sudo",
        f"wget -q -Y off -O /dev/null {installed_url(cluster, cluster.vm('ldap'))}",
    ]
    # key-only SSH logins, as cloud-init's ssh_pwauth: false on install=cloud VMs; Debian's sshd_config includes this
    assert (target / "etc/ssh/sshd_config.d/kvmconf.conf").read_text() == "PasswordAuthentication no\n"
    for user in login:  # it has no password, as on install=cloud VMs: sudo must not ask for one
        assert (target / "etc/sudoers.d" / f"kvmconf-{user}").read_text() == f"{user} ALL=(ALL) NOPASSWD:ALL\n"
    sudoers = target / "etc/sudoers.d" / f"kvmconf-{admin}"
    if accounts.admin_password_hash == "!":
        assert sudoers.read_text() == f"{admin} ALL=(ALL) NOPASSWD:ALL\n"
    else:
        assert not sudoers.exists()


def test_the_guest_agent_of_the_domain_xml_is_installed(example: Cluster) -> None:
    """Every domain has a guest agent channel (backups freeze filesystems through it); cloud-init installs the
    agent on install=cloud VMs, and the preseed must on install=pxe ones."""
    assert all("org.qemu.guest_agent.0" in str(text) for text in domain_xml.render(example).values())
    for _, answers in _pxe_answers(example):
        assert "qemu-guest-agent" in answers["pkgsel/include"][1].split()


def test_a_locked_admin_gets_sudo_without_password_and_only_then(example: Cluster) -> None:
    locked = _texts(example)[PurePosixPath("preseed/ldap.cfg")]
    with_password = _texts(_variant(example))[PurePosixPath("preseed/ldap.cfg")]
    assert "admin ALL=(ALL) NOPASSWD:ALL" in locked
    # (the variant's ssh_user, who has no password, does get a sudoers line of its own)
    assert "admin ALL=(ALL) NOPASSWD" not in with_password
    assert "kvmconf-admin" not in with_password
    assert "in-target adduser admin sudo" in with_password


def test_uefi_vms_get_an_efi_partition_and_removable_grub(example: Cluster) -> None:
    cluster = _variant(example)
    for vm, answers in _pxe_answers(cluster):
        recipe = answers["partman-auto/expert_recipe"][1]
        uefi = vm.boot is Boot.UEFI
        assert ("method{ efi }" in recipe) == uefi
        assert ("partman-efi/non_efi_system" in answers) == uefi
        assert ("grub-installer/force-efi-extra-removable" in answers) == uefi
        assert answers["grub-installer/bootdev"][1] == "/dev/vda"
        layout = preseed.partition_layout(vm)
        sizes = [[int(n) for n in part.split()[:3]] for part in recipe.split("::", 1)[1].split(" .") if part.strip()]
        assert sizes[-1] == [layout.swap_mb] * 3
        assert sizes[-2][0] == layout.root_min_mb
        assert sum(size[0] for size in sizes) <= vm.disk.size_gb * 1000


def _vm(example: Cluster, disk_gb: int, ram_mb: int, boot: Boot) -> Vm:
    base = example.vm("ldap")
    return dataclasses.replace(base, disk=dataclasses.replace(base.disk, size_gb=disk_gb), ram_mb=ram_mb, boot=boot)


@given(disk_gb=st.integers(1, 100_000), ram_mb=st.integers(1, 4_000_000), boot=st.sampled_from(Boot))
def test_partitions_fit_the_disk(example: Cluster, disk_gb: int, ram_mb: int, boot: Boot) -> None:
    layout = preseed.partition_layout(_vm(example, disk_gb, ram_mb, boot))
    assert layout.efi_mb + layout.swap_mb + layout.root_min_mb <= disk_gb * 1000
    assert 1 <= layout.swap_mb <= min(ram_mb, 4096)
    assert layout.root_min_mb >= 1
    if disk_gb >= 17:  # 4 GB of swap is at most a quarter: the swap rule applies in full, / gets its minimum
        assert layout.swap_mb == min(ram_mb, 4096)
        assert layout.root_min_mb == preseed.ROOT_MIN_MB


# --- debconf-set-selections -c --------------------------------------------------------------------------------


def _check(path: Path) -> tuple[int, str]:
    result = run([require_tool("debconf-set-selections"), "-c", str(path)])
    return result.returncode, result.stderr


@pytest.mark.consumer
@pytest.mark.parametrize("which", ["example", "variant"])
def test_debconf_set_selections_accepts_every_preseed(example: Cluster, tmp_path: Path, which: str) -> None:
    cluster = example if which == "example" else _variant(example)
    texts = _texts(cluster)
    assert texts
    for path, text in texts.items():
        staged = tmp_path / path.name
        staged.write_text(text)
        # -c exits 0 on an unknown type, only warning on stderr: any stderr is a failure.
        assert _check(staged) == (0, ""), path


@pytest.mark.consumer
def test_debconf_check_catches_a_missing_type(example: Cluster, tmp_path: Path) -> None:
    text = _texts(example)[PurePosixPath("preseed/ldap.cfg")]
    broken = tmp_path / "ldap.cfg"
    broken.write_text(text.replace("d-i netcfg/hostname string ldap", "d-i netcfg/hostname ldap"))
    assert broken.read_text() != text
    code, stderr = _check(broken)
    assert code == 0  # which is why the exit code alone is not enough
    assert "warning: Unknown type ldap, skipping line" in stderr
