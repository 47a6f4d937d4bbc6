"""The backup cron job: build/cron/kvmconf-backup, an /etc/cron.d file for the physical hosts.

Emitted only when at least one VM has backup=yes; with none, there is nothing for cron to run.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shlex
from pathlib import PurePosixPath

from generators.model import Cluster
from generators.render import render as render_template

TEMPLATE = "kvmconf-backup.cron.j2"
GRACE = dt.timedelta(hours=2)  # a run takes a while, and cron may start it late
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def cron_argument(text: str) -> str:
    """A path as one shell word of a cron command line.

    cron runs the command with /bin/sh (so quote spaces and the like) after turning every
    unescaped `%` into a newline (so escape it as `\\%`, see crontab(5)).
    """
    return shlex.quote(text).replace("%", "\\%")


def render(cluster: Cluster) -> dict[PurePosixPath, str | bytes]:
    covered: dict[str, list[str]] = {}
    for vm in cluster.vms:
        if vm.backup:
            covered.setdefault(vm.host, []).append(vm.name)
    if not covered:
        return {}
    backup = cluster.site.backup
    text = render_template(
        TEMPLATE,
        cluster,
        covered=sorted(covered.items()),
        excluded=[vm.name for vm in cluster.vms if not vm.backup],
        schedule=backup.schedule,
        verify_schedule=backup.verify_schedule,
        checkout=cron_argument(backup.checkout),
        log=cron_argument(backup.log),
    )
    return {PurePosixPath("cron", "kvmconf-backup"): text}


def field_values(text: str, low: int, high: int) -> set[int]:
    """The values of one time field; ValueError for what cron(8) refuses (names are not read here)."""
    values: set[int] = set()
    for part in text.split(","):
        spec, _, step = part.partition("/")
        if spec == "*":
            first, last = low, high
        elif "-" in spec:
            a, b = spec.split("-")
            first, last = int(a), int(b)
        else:
            first = last = int(spec)
            if step:
                last = high
        if not low <= first <= last <= high:  # cron refuses these; a huge range would also cost memory
            raise ValueError(f"{part!r} is outside {low}-{high}")
        values.update(range(first, last + 1, int(step) if step else 1))
    return values


_SPAN_DAYS = 2 * 366  # from 2024-01-01: two New Years, and a leap day


def _runs(schedule: str) -> tuple[list[dt.datetime], list[dt.timedelta]]:
    """The days of the two years from 2024-01-01 the schedule runs on, and its times on each such day."""
    fields = schedule.split()
    minute, hour, dom, month, dow = (field_values(f, lo, hi) for f, (lo, hi) in zip(fields, _RANGES, strict=True))
    dow = {d % 7 for d in dow}
    # As cron(8) decides it: a day field that starts with '*' (also '*/2') is unrestricted, and then a
    # day must match both fields; when neither is, either may match (crontab(5)).
    dom_any, dow_any = fields[2].startswith("*"), fields[4].startswith("*")
    times_of_day = [dt.timedelta(hours=h, minutes=m) for h in sorted(hour) for m in sorted(minute)]
    start = dt.datetime(2024, 1, 1)
    run_days = []
    for i in range(_SPAN_DAYS):
        day = start + dt.timedelta(days=i)
        day_dom, day_dow = day.day in dom, (day.isoweekday() % 7) in dow
        if day.month in month and ((day_dom and day_dow) if (dom_any or dow_any) else (day_dom or day_dow)):
            run_days.append(day)
    return run_days, times_of_day


def runs_in_two_years(schedule: str) -> int:
    """How many times the schedule runs in two years (0 for a day that never comes, such as February 31st)."""
    run_days, times_of_day = _runs(schedule)
    return len(run_days) * len(times_of_day)


def max_interval(schedule: str) -> dt.timedelta:
    """The longest time between two runs of a 5-field cron schedule (numbers, *, ranges, lists, steps).

    The days it runs on are found by walking two years day by day (the second one catches the gap
    across New Year, and a leap year is in it); day-of-month and day-of-week combine with OR when both
    are restricted, as in cron. Every such day has the same run times, so the longest gap is either
    inside a day or from one run day's last run to the next run day's first: listing every run would
    cost a second per load of site.toml for `* * * * *`. A schedule that never runs gets the whole span.
    """
    run_days, times_of_day = _runs(schedule)
    if len(run_days) * len(times_of_day) < 2:
        return dt.timedelta(days=_SPAN_DAYS)
    first, last = times_of_day[0], times_of_day[-1]
    gaps = [b - a for a, b in itertools.pairwise(times_of_day)]
    gaps += [next_day + first - (day + last) for day, next_day in itertools.pairwise(run_days)]
    return max(gaps)
