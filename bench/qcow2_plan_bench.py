"""How long laying out a backup file takes (kvmconf/backup/qcow2.plan), for the largest disks an admin backs up.

A full of a 2 TiB disk holding 1 TiB is 16M data clusters: the plan must not walk them one by one in Python.
Its cost grows with the number of separate data runs instead, which a fragmented thin disk has many of.
Prints the median of 5 plans per case, in seconds: it should stay small next to copying the same data
(about a second per GiB on the bench machine).

    .venv/bin/python bench/qcow2_plan_bench.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmconf.backup.qcow2 import plan

GIB = 1 << 30
CASES = {
    "2 TiB disk, 1 TiB of data in two runs": (2 << 40, [(0, 512 * GIB), (1 << 40, 512 * GIB - 1)], []),
    # A fragmented thin disk: every other cluster of its first 128 GiB holds data (1M runs).
    "2 TiB disk, 64 GiB in 64 KiB pieces 128 KiB apart (1M runs)":
        (2 << 40, [(i << 17, 1 << 16) for i in range(1 << 20)], []),
    "incremental: 20 MiB dirty on a 2 GiB disk": (2 * GIB, [(300 << 20, 20 << 20)], [(400 << 20, 1 << 20)]),
}


def main() -> int:
    for name, (size, data, zero) in CASES.items():
        times = []
        for _ in range(5):
            started = time.perf_counter()
            plan(size, data, zero)
            times.append(time.perf_counter() - started)
        print(f"{name:62} {median(times):7.3f} s   (" + " ".join(f"{t:.3f}" for t in times) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
