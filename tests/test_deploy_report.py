"""The one-line summary of a VM's deploy, done and dry run, word for word (no VM needed: the report is data)."""

from __future__ import annotations

import pytest

from kvmconf.deploy import RunReport, VmReport


def full_run(dry_run: bool) -> VmReport:
    """A deploy that installed, pushed, reloaded and ran hooks: every part of the line is there."""
    return VmReport("ldap", steps=["packages", "files", "hooks"], installed=["slapd", "ldap-utils"],
                    pushed=["/etc/ldap/ldap.conf"], reloaded=["nscd", "slapd"], hooks=["ldap/hooks/init.sh"],
                    dry_run=dry_run)


@pytest.mark.parametrize(("report", "line"), [
    (full_run(dry_run=False),
     "ldap: done (2 package(s) installed; 1 file(s) changed; reloaded nscd, slapd; 1 hook(s) run)"),
    (full_run(dry_run=True),
     "ldap: would install 2 package(s) (slapd, ldap-utils); change 1 file(s) (/etc/ldap/ldap.conf);"
     " reload nscd, slapd; run 1 hook(s) (ldap/hooks/init.sh)"),
    # update-confs: files only, nothing changed; the package and hook parts are left out, not shown as 0
    (VmReport("db", steps=["files"]), "db: done (0 file(s) changed)"),
    (VmReport("db", steps=["files"], dry_run=True), "db: would change 0 file(s)"),
    # a full deploy that found nothing to do still says so for packages and hooks
    (VmReport("db", steps=["packages", "files", "hooks"]),
     "db: done (0 package(s) installed; 0 file(s) changed; 0 hook(s) run)"),
    (VmReport("db", steps=["packages", "files", "hooks"], dry_run=True),
     "db: would install 0 package(s); change 0 file(s); run 0 hook(s)"),
    (VmReport("db", steps=["packages"], failed_step="files", error="exit 1: no space left on device"),
     "db: FAILED at files: exit 1: no space left on device"),
])
def test_the_line_says_what_was_done_or_would_be(report: VmReport, line: str) -> None:
    assert report.line() == line


def test_the_summary_counts_the_vms_and_names_the_failed_ones_without_repeating_their_lines() -> None:
    # fab printed each VM's line as it ended; the summary only counts, names the failures and what never started.
    report = RunReport("deploy", [VmReport("mcp", steps=["packages", "files", "hooks"]),
                                  VmReport("ldap", steps=["packages"], failed_step="files", error="exit 1: disk full"),
                                  VmReport("web", failed_step="connect", error="web: host key unknown")],
                       not_started=["db", "login"])
    assert report.summary() == "deploy: 3 VM(s), 2 failed: ldap (files), web (connect); not started (an earlier" \
                               " failure stopped later waves): db, login"
    assert RunReport("update-confs", [VmReport("db", steps=["files"])]).summary() == "update-confs: 1 VM(s), 0 failed"
