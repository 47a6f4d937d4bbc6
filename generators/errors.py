"""Typed errors: user mistakes are collected as Problems and raised once as ConfigError.

Exit codes are decided only at the edges (``python -m generators``, ``tasks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Location:
    """Where a value came from: 1-based line and column in a file."""

    path: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line == 0:
            return self.path
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the input, with where it is and what is allowed."""

    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ConfigError(Exception):
    """The inventory or site file is invalid; carries every problem found, sorted."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(set(problems))
        super().__init__("\n".join(str(p) for p in self.problems))


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a 10 MB line cannot flood the terminal."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        return "a number too large to show"
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit - 4]}...{text[-1]}{size}"


class UsageError(Exception):
    """The command was called wrongly (missing file, bad flag): exit status 2."""
