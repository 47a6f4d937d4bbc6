"""What the invoke and fab tasks share: turning the admin's errors into a message and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt
from invoke import Exit

from generators.errors import ConfigError, UsageError
from kvmconf.connection import one_line
from kvmconf.errors import KvmconfError

INTERRUPTED = "kvmconf: interrupted"  # the last line of a task that Ctrl-C (or its own SIGTERM handling) ended


@contextmanager
def user_errors() -> Iterator[None]:
    """Problems the admin can fix, and interrupts, become a message and an exit status (1; 2 for usage); bugs keep
    their traceback.

    A call libvirt refuses or fails (a bridge missing on the host at start, a daemon gone mid-run) is one of those:
    libvirt's message names what failed, and a traceback would only bury it.
    """
    try:
        yield
    except ConfigError as err:
        count = len(err.problems)
        raise Exit("\n".join(map(str, err.problems)) + f"\nkvmconf: {count} problem{'s' * (count != 1)}", 1) from None
    except UsageError as err:
        raise Exit(f"kvmconf: {err}", 2) from None
    except KvmconfError as err:
        raise Exit(f"kvmconf: {err}", 1) from None
    except libvirt.libvirtError as err:
        raise Exit(f"kvmconf: libvirt failed: {one_line(err)}", 1) from None
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM inside sigterm_as_interrupt: invoke would exit 1 without a word, which after a
        # Ctrl-C while a task still plans looks like a crash. What the task undid, it has said by now: flushed
        # first, so a log that takes both streams (cron's) has that before this.
        sys.stdout.flush()
        raise Exit(INTERRUPTED, 1) from None


def say(line: str) -> None:
    """Print a progress line now: flushed, so a pipe (`| tee log`) shows it as the run goes, not at its end."""
    print(line, flush=True)
