"""The whole pipeline on the example cluster: rebuilds touch only what changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from generators.build import build


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in ("cluster.conf", "site.toml"):
        shutil.copy(name, tmp_path / name)
    return tmp_path


def _edit_vm(cluster: Path, name: str, column: int, value: str) -> None:
    lines = cluster.read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if fields[0] == name:
            fields[column] = value
            lines[i] = "\t".join(fields)
    cluster.write_text("\n".join(lines) + "\n")


def test_every_generator_contributes_and_the_rebuild_is_a_no_op(workdir: Path) -> None:
    out = workdir / "build"
    first = build(workdir / "cluster.conf", workdir / "site.toml", out)
    tops = {path.parts[0] for path in first.report.written}
    assert tops >= {"dnsmasq", "tftp", "preseed", "cloud-init", "ssh", "nagios", "libvirt", "dns", "ansible",
                    "hosts", "cron"}
    before = _snapshot(out)
    again = build(workdir / "cluster.conf", workdir / "site.toml", out)
    assert again.report.skipped and again.report.written == []
    forced = build(workdir / "cluster.conf", workdir / "site.toml", out, force=True)
    assert forced.report.written == [] and forced.report.removed == []
    assert forced.report.unchanged == len(first.report.written)
    assert _snapshot(out) == before


def test_changing_one_vm_rewrites_only_files_that_name_it(workdir: Path) -> None:
    out = workdir / "build"
    build(workdir / "cluster.conf", workdir / "site.toml", out)
    _edit_vm(workdir / "cluster.conf", "ldap", 2, "192.168.50.11")  # a new IP for ldap
    result = build(workdir / "cluster.conf", workdir / "site.toml", out)
    written = [str(p) for p in result.report.written]
    assert "libvirt/ldap.xml" not in written  # the domain does not carry the IP
    assert "preseed/ldap.cfg" in written and "dnsmasq/dhcp-hosts/ldap" in written
    assert "dnsmasq/dnsmasq.conf" not in written
    for path in written:
        content = (out / path).read_bytes()
        assert b"ldap" in path.encode() or b"ldap" in content, f"{path} was rewritten but does not name ldap"
    assert result.report.removed == []


def test_a_removed_vm_leaves_no_file_behind(workdir: Path) -> None:
    out = workdir / "build"
    build(workdir / "cluster.conf", workdir / "site.toml", out)
    assert (out / "libvirt/scratch.xml").exists()
    cluster = workdir / "cluster.conf"
    cluster.write_text("".join(line for line in cluster.read_text().splitlines(True)
                               if not line.startswith("scratch\t")))
    result = build(cluster, workdir / "site.toml", out)
    removed = [str(p) for p in result.report.removed]
    assert "libvirt/scratch.xml" in removed and "dnsmasq/dhcp-hosts/scratch" in removed
    assert not any("scratch" in str(p) for p in out.rglob("*"))
    assert not any(b"scratch" in p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".kvmconf-stamp")
