"""kvmconf.cli.user_errors, which every invoke and fab task runs inside: what ends a task, as the admin sees it."""

from __future__ import annotations

import pytest
from invoke import Exit

from kvmconf.cli import user_errors


def test_an_interrupt_ends_the_task_saying_so() -> None:
    """invoke itself turns KeyboardInterrupt into exit status 1 and prints nothing. (Real interrupts of real runs, by
    SIGTERM, are in tests/test_migrate_interrupt.py; their output ends with this line.)"""
    with pytest.raises(Exit) as ended, user_errors():
        raise KeyboardInterrupt
    assert (ended.value.message, ended.value.code) == ("kvmconf: interrupted", 1)
