"""`python -m generators` as users run it: exit status 0 built, 1 invalid input, 2 usage error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generators.columns import markdown_tables
from tests.tools import ROOT, missing, require_tool

SUMMARY = re.compile(r"kvmconf: 8 VMs on 2 hosts; (?P<build>\S+)/: (?P<written>\d+) written, 0 unchanged, 0 removed")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_")}
    environment.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([*prefix, sys.executable, "-m", "generators", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A directory holding copies of the example cluster.conf and site.toml."""
    for name in ("cluster.conf", "site.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def snapshot(tree: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's content and mtime (ns), and every directory, under tree."""
    found: dict[str, tuple[bytes, int]] = {}
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(tree))] = (b"<dir>" if path.is_dir() else path.read_bytes(), st.st_mtime_ns)
    return found


def test_build_with_flags(inputs: Path) -> None:
    result = run("--cluster", "cluster.conf", "--site", "site.toml", "--build", "out", cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:2] == ["placed login on kvm0 (host=auto; add host=kvm0 to its line to pin it)",
                         "placed scratch on kvm0 (host=auto; add host=kvm0 to its line to pin it)"]
    match = SUMMARY.fullmatch(lines[-1])
    assert match and match["build"] == "out" and int(match["written"]) > 0
    assert int(match["written"]) == sum(1 for p in (inputs / "out").rglob("*") if p.is_file()) - 1  # minus the stamp


def test_a_pxe_vm_with_too_little_ram_for_the_installer_gets_a_note_and_is_built(inputs: Path) -> None:
    conf = inputs / "cluster.conf"
    lines = conf.read_text().splitlines(keepends=True)
    (number,) = [i + 1 for i, line in enumerate(lines) if line.startswith("web\t")]  # install=pxe (the default)
    lines[number - 1] = lines[number - 1].replace("\t2048\t", "\t512\t", 1)
    conf.write_text("".join(lines))
    result = run("--cluster", "cluster.conf", "--site", "site.toml", "--build", "out", cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"cluster.conf:{number}: note: web installs over PXE with 512 MB of RAM: the Debian"
                             " installer needs 1024 MB, or it stops at its low-memory note\n")
    assert (inputs / "out/dnsmasq/dhcp-hosts/web").is_file()


def test_build_with_environment_variables(inputs: Path) -> None:
    (inputs / "in").mkdir()
    for name in ("cluster.conf", "site.toml"):
        (inputs / name).rename(inputs / "in" / name)
    result = run(cwd=inputs, env={"KVMCONF_CLUSTER": "in/cluster.conf", "KVMCONF_SITE": "in/site.toml",
                                  "KVMCONF_BUILD": "gen"})
    assert result.returncode == 0, result.stderr
    match = SUMMARY.fullmatch(result.stdout.splitlines()[-1])
    assert match and match["build"] == "gen"
    assert (inputs / "gen" / "dnsmasq").is_dir() and not (inputs / "build").exists()


@pytest.mark.parametrize("variable", ["KVMCONF_CLUSTER", "KVMCONF_SITE", "KVMCONF_BUILD"])
def test_an_empty_environment_variable_means_the_default(variable: str, inputs: Path) -> None:
    """As the Makefile's `$(or $(KVMCONF_BUILD),build)`: taken as given, KVMCONF_BUILD= would be the current folder."""
    result = run(cwd=inputs, env={variable: ""})
    assert result.returncode == 0, result.stderr
    match = SUMMARY.fullmatch(result.stdout.splitlines()[-1])
    assert match and match["build"] == "build"
    assert (inputs / "build" / "dnsmasq").is_dir()


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["CLUSTER=", "SITE=", "BUILD="], {}, "--cluster cluster.conf --site site.toml --build build"),
    (["BUILD="], {"KVMCONF_BUILD": "gen"}, "--cluster cluster.conf --site site.toml --build gen"),
    (["BUILD=out"], {"KVMCONF_BUILD": "gen"}, "--cluster cluster.conf --site site.toml --build out"),
])
def test_make_takes_an_empty_variable_as_unset(args: list[str], env: dict[str, str], expected: str) -> None:
    """README: a variable set to the empty string counts as unset, on make's command line too."""
    # Without the caller's MAKEFLAGS: under `make -C <checkout> check` they carry -w, and the last line of the
    # output would be "make[1]: Leaving directory ...".
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_") and k != "MAKEFLAGS"} | env
    result = subprocess.run(["make", "-s", "-n", "build", *args], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith(f"-m generators {expected}")


def _make_clean(build: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KVMCONF_") and k != "MAKEFLAGS"}
    return subprocess.run(["make", "-s", "clean", f"BUILD={build}"], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=60)


def test_make_clean_removes_a_build_and_nothing_else(inputs: Path) -> None:
    """`make clean` is rm -rf of BUILD: like the writer, it removes only a folder kvmconf wrote (or an empty one).
    A BUILD or KVMCONF_BUILD naming another folder (KVMCONF_BUILD=/srv for /srv/build) lost all its files."""
    assert run("--build", "out", cwd=inputs).returncode == 0
    result = _make_clean(inputs / "out")
    assert (result.returncode, result.stderr) == (0, "")
    assert not (inputs / "out").exists()
    assert _make_clean(inputs / "out").returncode == 0  # nothing to remove: fine
    (inputs / "empty").mkdir()
    assert _make_clean(inputs / "empty").returncode == 0 and not (inputs / "empty").exists()
    result = _make_clean(inputs)  # cluster.conf and site.toml, no stamp: not a build
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == (f"kvmconf: {inputs}: not a build folder kvmconf wrote (it is not empty and"
                                             " has no .kvmconf-stamp), so make clean removes nothing")
    assert [(inputs / name).read_text() == (ROOT / name).read_text() for name in ("cluster.conf", "site.toml")] == [
        True, True]


def test_flags_win_over_environment(inputs: Path) -> None:
    result = run("--cluster", "cluster.conf", cwd=inputs, env={"KVMCONF_CLUSTER": "missing.conf"})
    assert result.returncode == 0, result.stderr


def test_check_validates_and_writes_nothing(inputs: Path) -> None:
    result = run("--check", cwd=inputs)
    assert (result.returncode, result.stdout, result.stderr) == (0, "cluster.conf: 8 VMs, valid\n", "")
    assert sorted(p.name for p in inputs.iterdir()) == ["cluster.conf", "site.toml"]


def test_invalid_input_exits_1_and_leaves_build_untouched(inputs: Path) -> None:
    assert run(cwd=inputs).returncode == 0  # a build/ from an earlier, good run
    before = snapshot(inputs / "build")
    assert before
    with (inputs / "cluster.conf").open("a") as conf:
        conf.write("db\t52:54:00:50:00:99\t192.168.50.999\t1024\t10\t1\t-\thost=kvm9\n")
    (inputs / "site.toml").write_text((ROOT / "site.toml").read_text().replace("keep = 2", "keep = -2"))
    result = run("--force", cwd=inputs)
    assert result.returncode == 1
    assert result.stdout == ""
    *problems, last = result.stderr.splitlines()
    assert problems == [
        "cluster.conf:12:1: column 'name': 'db' is already used on line 7 (expected unique names)",
        "cluster.conf:12:22: column 'ip': '192.168.50.999' is not an IPv4 address (expected a.b.c.d)",
        "site.toml:89:1: key 'backup.keep': -2 is out of range (expected a positive integer)",
    ]
    assert last == "kvmconf: 3 problems; nothing was written"
    assert snapshot(inputs / "build") == before
    assert sorted(p.name for p in inputs.iterdir() if p.name.startswith(".kvmconf-staging")) == []


@pytest.mark.parametrize("junk", [b"\x00\x01\x02binary\xff", b"\xff\xfe\xfd", b"", b"a b c\r\n" * 3,
                                  b"x" * 2_000_000])
def test_broken_files_never_give_a_traceback(junk: bytes, inputs: Path) -> None:
    (inputs / "cluster.conf").write_bytes(junk)
    result = run(cwd=inputs)
    assert result.returncode == 1
    *problems, last = result.stderr.splitlines()
    assert problems and all(re.match(r"cluster\.conf:\d+:\d+: \S", line) and len(line) < 400 for line in problems)
    assert re.fullmatch(r"kvmconf: \d+ problems?; nothing was written", last)
    assert "Traceback" not in result.stderr and not (inputs / "build").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--cluster", "nothere.conf"], "kvmconf: nothere.conf: no such file (give the inventory with --cluster,"
                                    " CLUSTER=... or KVMCONF_CLUSTER)"),
    (["--site", "nothere.toml"], "kvmconf: nothere.toml: no such file (give the site settings with --site, SITE=..."
                                 " or KVMCONF_SITE)"),
    (["--cluster", "."], "kvmconf: .: is a directory, not a cluster.conf file"),
    (["--site", "."], "kvmconf: .: is a directory, not a TOML file"),
])
def test_missing_files_are_usage_errors(args: list[str], message: str, inputs: Path) -> None:
    result = run(*args, cwd=inputs)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")
    assert not (inputs / "build").exists()


def test_unknown_flag_is_a_usage_error(inputs: Path) -> None:
    result = run("--clutser", "x", cwd=inputs)
    assert result.returncode == 2
    assert "unrecognized arguments: --clutser x" in result.stderr and result.stderr.startswith("usage: ")


def test_doc_prints_the_tables(inputs: Path) -> None:
    result = run("--doc", cwd=inputs)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == markdown_tables()
    assert result.stdout.startswith("| # | column | meaning | rules |\n")


def test_readme_holds_the_doc_output() -> None:
    """`make doc` output pasted between the markers; regenerate the block when columns.py changes."""
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- columns:begin -->\n", "<!-- columns:end -->"
    assert readme.count(begin) == 1 and readme.count(end) == 1, "README.md needs the columns markers"
    block = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert block == markdown_tables()


def test_readme_shows_the_real_summary_of_the_example(inputs: Path) -> None:
    """The Quick start quotes what `make` prints for the example: it stayed stale for weeks while no test read it."""
    quoted = re.findall(r"`(kvmconf: \d+ VMs on [^`]*)`", (ROOT / "README.md").read_text())
    assert len(quoted) == 1, "README.md should quote the example's summary line once, in backquotes"
    result = run(cwd=inputs)  # a fresh build, with `make`'s defaults
    assert result.returncode == 0, result.stderr
    assert quoted[0] == result.stdout.splitlines()[-1]


def test_readme_shows_the_real_errors_of_its_bad_input_example(inputs: Path) -> None:
    """The Quick start's error example, as the example cluster.conf gives it with the two mistakes it names."""
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("With a typo in db's MAC and ldap's IP given to web:\n\n```\n", 1)[1].split("```", 1)[0]
    conf = inputs / "cluster.conf"
    text = conf.read_text()
    for old, new in (("db\t52:54:00:50:00:20", "db\t52:54:00:zz:00:20"), ("web\t52:54:00:50:00:21\t192.168.50.21",
                                                                           "web\t52:54:00:50:00:21\t192.168.50.10")):
        assert text.count(old) == 1
        text = text.replace(old, new)
    conf.write_text(text)
    result = run("--check", cwd=inputs)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", shown)


def test_a_build_folder_kvmconf_did_not_write_is_refused_and_kept(inputs: Path) -> None:
    """`--build .` in a checkout would swap the whole repository for the build (and delete it)."""
    before = snapshot(inputs)
    result = run("--build", ".", cwd=inputs)
    here = inputs.resolve()
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"kvmconf: {here}: not a build folder kvmconf wrote (it is not empty and has no .kvmconf-stamp); replacing"
        f" it would delete its files, so nothing was written. Give --build a new or empty folder (e.g. {here}/build),"
        " or remove this one first if it only holds an old build\n")
    assert snapshot(inputs) == before
    beside = [p.name for p in inputs.parent.iterdir() if p.name.startswith((f".{inputs.name}", ".kvmconf-staging"))]
    assert beside == []  # nothing written, not even the lock file


@pytest.mark.parametrize("mount", ["-t tmpfs kvmconf-test", "--bind src"], ids=["tmpfs", "bind-mount"])
def test_a_build_folder_that_is_a_mount_point_is_refused(inputs: Path, mount: str) -> None:
    """A rename cannot move a mount point, so the build cannot be swapped in: a clear error, no traceback.

    The mount is made in a mount namespace of the test's own, which vanishes with it. A bind mount of the
    same filesystem is one os.path.ismount does not see: the rename's EBUSY is what tells it.
    """
    unshare = require_tool("unshare")
    if os.geteuid() != 0:
        missing("mounting a test filesystem needs root")
    (inputs / "mnt").mkdir()
    (inputs / "src").mkdir()
    # The generator runs as "$@"; then `ls -A` shows what it left inside the mount (nothing, we expect).
    script = f'mount {mount} mnt || exit 99; "$@"; status=$?; ls -A mnt; exit $status'
    result = run("--build", "mnt", cwd=inputs, prefix=(unshare, "--mount", "--propagation", "private",
                                                       "sh", "-c", script, "sh"))
    mnt = inputs.resolve() / "mnt"
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr == (
        f"kvmconf: {mnt}: is a mount point, which cannot be swapped for the new build (a rename cannot move a mount"
        f" point); nothing was changed. Give --build a folder inside it (e.g. {mnt}/build)\n")
    assert list((inputs / "src").iterdir()) == []
    assert [p.name for p in inputs.iterdir() if p.name.startswith(".kvmconf-staging")] == []
