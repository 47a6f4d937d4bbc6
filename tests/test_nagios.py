"""Nagios objects: golden files, and `nagios4 -v` on a staged nagios.cfg (alone and with Debian's)."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from pathlib import Path, PurePosixPath

import pytest

from generators import nagios
from generators.model import Cluster
from tests.golden import assert_golden
from tests.tools import require_tool, run

DEBIAN_NAGIOS_CFG = Path("/etc/nagios4/nagios.cfg")
# What our files use from Debian: notify-*-by-email, timeperiod 24x7, and the plugin commands
# check-host-alive, check_ping, check_ssh (monitoring-plugins' /etc/nagios-plugins/config).
DEBIAN_OBJECTS = ("cfg_file=/etc/nagios4/objects/commands.cfg", "cfg_file=/etc/nagios4/objects/timeperiods.cfg",
                  "cfg_dir=/etc/nagios-plugins/config")


def _with_aliases(cluster: Cluster, **aliases: str) -> Cluster:
    known = dict(cluster.site.hostgroups or {})
    known.update({name.replace("_", "-"): alias for name, alias in aliases.items()})
    return dataclasses.replace(cluster, site=dataclasses.replace(cluster.site, hostgroups=known))


def _write_objects(cluster: Cluster, directory: Path) -> None:
    directory.mkdir()
    for path, content in nagios.render(cluster).items():
        assert isinstance(content, str)
        (directory / path.name).write_text(content)


def _state_settings(tmp_path: Path) -> list[str]:
    """Everything nagios4 -v may open or check, inside tmp_path; run as whoever runs the tests."""
    state = tmp_path / "var"
    (state / "checkresults").mkdir(parents=True, exist_ok=True)
    return [
        f"check_result_path={state / 'checkresults'}",
        *(f"{key}={state / name}" for key, name in [
            ("lock_file", "nagios.pid"), ("temp_file", "nagios.tmp"), ("status_file", "status.dat"),
            ("log_file", "nagios.log"), ("object_cache_file", "objects.cache"),
            ("precached_object_file", "objects.precache"), ("state_retention_file", "retention.dat"),
            ("command_file", "nagios.cmd"), ("debug_file", "nagios.debug"), ("log_archive_path", "archives"),
        ]),
        f"temp_path={state}",
        f"nagios_user={pwd.getpwuid(os.getuid()).pw_name}",
        f"nagios_group={grp.getgrgid(os.getgid()).gr_name}",
        # Debian's value; without it nagios4 warns "Nothing specified for illegal_macro_output_chars".
        "illegal_macro_output_chars=`~$&|'\"<>",
    ]


def _standalone_cfg(tmp_path: Path, objects: Path) -> Path:
    cfg = tmp_path / "nagios.cfg"
    cfg.write_text("\n".join([*DEBIAN_OBJECTS, f"cfg_dir={objects}", *_state_settings(tmp_path)]) + "\n")
    return cfg


def _debian_cfg(tmp_path: Path, objects: Path, keep_localhost: bool) -> Path:
    """Debian's own nagios.cfg, with our objects in place of conf.d and its state moved to tmp_path."""
    overridden = {line.split("=", 1)[0] for line in _state_settings(tmp_path)}
    lines = []
    for line in DEBIAN_NAGIOS_CFG.read_text().splitlines():
        key = line.split("=", 1)[0]
        if key in overridden or (line.endswith("/localhost.cfg") and not keep_localhost):
            continue
        lines.append(f"cfg_dir={objects}" if line == "cfg_dir=/etc/nagios4/conf.d" else line)
    assert f"cfg_dir={objects}" in lines, "Debian's nagios.cfg no longer reads /etc/nagios4/conf.d"
    cfg = tmp_path / "nagios.cfg"
    cfg.write_text("\n".join([*lines, *_state_settings(tmp_path)]) + "\n")
    return cfg


def _verify(cfg: Path, *flags: str) -> str:
    result = run([require_tool("nagios4"), *flags, "-v", str(cfg)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Total Warnings: 0\n" in output, output
    assert "Total Errors:   0\n" in output, output
    return output


def test_golden(example: Cluster, regenerate: bool) -> None:
    assert_golden("nagios", nagios.render(example), regenerate)


def test_each_used_hostgroup_once_sorted_with_alias(example: Cluster) -> None:
    text = nagios.render(example)[PurePosixPath("nagios/hostgroups.cfg")]
    assert isinstance(text, str)
    names = [line.split()[1] for line in text.splitlines() if line.strip().startswith("hostgroup_name")]
    assert names == ["compute", "databases", "infrastructure", "linux-servers", "login-nodes", "web-servers"]
    assert "    alias           Cluster infrastructure\n" in text


def test_host_without_hostgroups_has_no_hostgroups_line(example: Cluster) -> None:
    text = nagios.render(example)[PurePosixPath("nagios/hosts.cfg")]
    assert isinstance(text, str)
    scratch = text.split("host_name               scratch\n")[1].split("}")[0]
    assert scratch.split() == ["alias", "scratch.phys.example.org", "address", "192.168.50.102"]


def test_alias_semicolon_is_escaped_and_newline_flattened() -> None:
    assert nagios.object_value("R&D; <lab>\n  east") == "R&D\\; <lab> east"


@pytest.mark.parametrize(("alias", "value"), [("C:\\", "C:\\\\"), ("a \\ b", "a \\ b"), ("x\\;", "x\\\\;")])
def test_only_a_final_backslash_is_doubled(alias: str, value: str) -> None:
    assert nagios.object_value(alias) == value


def test_blank_alias_falls_back_to_the_name(example: Cluster) -> None:
    groups = nagios.hostgroups(_with_aliases(example, web_servers="  "))
    assert nagios.Hostgroup("web-servers", "web-servers") in groups


@pytest.mark.consumer
def test_nagios_accepts_objects_with_only_debian_commands_and_timeperiods(example: Cluster, tmp_path: Path) -> None:
    _write_objects(example, tmp_path / "objects")
    output = _verify(_standalone_cfg(tmp_path, tmp_path / "objects"))
    # Proves our files were read, not just an empty object set accepted.
    # 16 = PING + SSH per VM, 7 = BACKUP for the VMs with backup=yes.
    for count in ("Checked 23 services.", "Checked 8 hosts.", "Checked 6 host groups.", "Checked 1 contacts."):
        assert count in output, output


@pytest.mark.consumer
def test_nagios_accepts_objects_beside_debian_config_without_localhost(example: Cluster, tmp_path: Path) -> None:
    _write_objects(example, tmp_path / "objects")
    output = _verify(_debian_cfg(tmp_path, tmp_path / "objects", keep_localhost=False))
    assert "Checked 8 hosts." in output, output


@pytest.mark.consumer
def test_debian_localhost_cfg_clashes_with_hostgroup_linux_servers(example: Cluster, tmp_path: Path) -> None:
    """Why nagios.py's docstring says to drop localhost.cfg: it defines linux-servers too."""
    _write_objects(example, tmp_path / "objects")
    result = run([require_tool("nagios4"), "-v", str(_debian_cfg(tmp_path, tmp_path / "objects", keep_localhost=True))])
    assert result.returncode != 0
    assert "Duplicate definition found for hostgroup 'linux-servers'" in result.stdout, result.stdout


@pytest.mark.consumer
def test_nagios_reads_escaped_alias_back_unchanged(example: Cluster, tmp_path: Path) -> None:
    cluster = _with_aliases(example, web_servers="Web; & <public> # servers")
    _write_objects(cluster, tmp_path / "objects")
    _verify(_standalone_cfg(tmp_path, tmp_path / "objects"), "-p")  # -p writes objects.precache
    precache = (tmp_path / "var/objects.precache").read_text()
    assert "\thostgroup_name\tweb-servers\n\talias\tWeb; & <public> # servers\n" in precache


@pytest.mark.consumer
@pytest.mark.parametrize("alias", ["Windows share C:\\", "two \\\\", "mid \\ dle\\; end\\"])
def test_nagios_reads_an_alias_ending_in_a_backslash_back_unchanged(example: Cluster, tmp_path: Path,
                                                                    alias: str) -> None:
    """A backslash ending a line continues it in Nagios: unescaped, it would swallow the closing brace."""
    _write_objects(_with_aliases(example, web_servers=alias), tmp_path / "objects")
    _verify(_standalone_cfg(tmp_path, tmp_path / "objects"), "-p")
    precache = (tmp_path / "var/objects.precache").read_text()
    assert f"\thostgroup_name\tweb-servers\n\talias\t{alias}\n" in precache
