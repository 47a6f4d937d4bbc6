"""`python -m generators`: validate cluster.conf + site.toml and write build/.

Exit status: 0 built, 1 invalid input (every problem printed, nothing written), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from generators import locations
from generators.build import build, render_all
from generators.columns import markdown_tables
from generators.errors import ConfigError, UsageError
from generators.model import Install

SHOWN_PLACEMENTS = 20  # and notes of one kind
INSTALLER_RAM_MB = 1024  # below it Debian's installer stops at its low-memory note (README)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m generators", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", type=Path, default=locations.cluster_path(),
                        help="inventory file (default: $KVMCONF_CLUSTER or cluster.conf)")
    parser.add_argument("--site", type=Path, default=locations.site_path(),
                        help="site settings (default: $KVMCONF_SITE or site.toml)")
    parser.add_argument("--build", type=Path, default=locations.build_dir(),
                        help="output directory (default: $KVMCONF_BUILD or build)")
    parser.add_argument("--check", action="store_true", help="validate only; write nothing")
    parser.add_argument("--force", action="store_true", help="render and compare even if the inputs are unchanged")
    parser.add_argument("--doc", action="store_true", help="print the README's column and option tables")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every file written or removed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on a usage error, as argparse does
    if args.doc:
        print(markdown_tables(), end="")
        return 0
    try:
        if args.check:
            from generators.validate import load_cluster

            cluster = load_cluster(args.cluster, args.site)
            render_all(cluster)  # in memory: a generator refuses what it cannot render (the Nagios backup check)
            print(f"{args.cluster}: {len(cluster.vms)} VMs, valid")
            return 0
        result = build(args.cluster, args.site, args.build, force=args.force)
    except UsageError as err:
        print(f"kvmconf: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        count = len(err.problems)
        print(f"kvmconf: {count} problem{'s' * (count != 1)}; nothing was written", file=sys.stderr)
        return 1
    if args.verbose:
        for path in result.report.written:
            print(f"wrote {args.build / path}")
        for path in result.report.removed:
            print(f"removed {args.build / path}")
    if not args.quiet:
        cluster = result.cluster
        placed = [vm for vm in cluster.vms if vm.auto_placed]
        for vm in placed[:SHOWN_PLACEMENTS]:
            print(f"placed {vm.name} on {vm.host} (host=auto; add host={vm.host} to its line to pin it)")
        if len(placed) > SHOWN_PLACEMENTS:
            print(f"... and {len(placed) - SHOWN_PLACEMENTS} more VMs placed automatically")
        # A note, not a refusal: the line is valid, and the lab boots 128 MB VMs only as far as the installer.
        small = [vm for vm in cluster.vms if vm.install is Install.PXE and vm.ram_mb < INSTALLER_RAM_MB]
        for vm in small[:SHOWN_PLACEMENTS]:
            print(f"{args.cluster}:{vm.line}: note: {vm.name} installs over PXE with {vm.ram_mb} MB of RAM: the Debian"
                  f" installer needs {INSTALLER_RAM_MB} MB, or it stops at its low-memory note", file=sys.stderr)
        if len(small) > SHOWN_PLACEMENTS:
            print(f"... and {len(small) - SHOWN_PLACEMENTS} more VMs like it", file=sys.stderr)
        print(f"kvmconf: {len(cluster.vms)} VMs on {len({vm.host for vm in cluster.vms})} hosts;"
              f" {args.build}/: {result.report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
