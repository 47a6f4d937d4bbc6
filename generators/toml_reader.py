"""Reading a TOML file so that its problems read like cluster.conf's: each with the line and column of its key.

tomllib gives values without positions: :func:`locator` finds each key's line in the text, and :class:`TableReader`
gives typed access to one table that records a problem (with that line) instead of raising. site.toml and the
recipes' recipe.toml are read with these, so their problems are worded alike.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from generators.columns import MAX_INT
from generators.errors import ConfigError, Location, Problem, UsageError, shown
from generators.inventory import BOM

T = TypeVar("T")
MISSING: Any = object()  # no default: the key is required

# site.toml's strings are written as they are into preseeds, dnsmasq.conf, cloud-init, XML: a newline would add a
# line of its own (`d-i preseed/late_command ...`), so no string of site.toml may hold a control character.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
               dict: "a table"}

Locate = Callable[[str, str], Location]


def type_of(value: Any) -> str:
    """What a TOML value is, in words: 'a string', 'an integer', ..."""
    return next((name for kind, name in _TYPE_NAMES.items() if type(value) is kind), "a date or time")


class TableReader:
    """Typed access to one TOML table that records problems instead of raising.

    site.toml's reader, also used for other TOML files of the project (recipe.toml), so that their
    problems are worded alike."""

    def __init__(self, data: dict[str, Any], table: str, locate: Locate, problems: list[Problem],
                 absent: bool = False, one_line: bool = False) -> None:
        self.data = data
        self.table = table
        self.locate = locate
        self.problems = problems
        self.absent = absent  # the table itself is missing (already reported): no problem per missing key
        self.one_line = one_line  # refuse control characters in strings (and lists of strings): see _CONTROL
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.table}.{key}" if self.table else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.locate(self.table, key), f"key '{self.where(key)}': {message}"))

    def get(self, key: str, kind: type, default: Any = MISSING, what: str = "") -> Any:
        self.used.add(key)
        what = what or _TYPE_NAMES[kind]
        if key not in self.data:
            if default is MISSING and not self.absent:
                self.problems.append(Problem(self.locate(self.table, ""),
                                             f"key '{self.where(key)}' is missing (expected {what})"))
            return None if default is MISSING else default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(key, f"{shown(value)} is {type_of(value)} (expected {what})")
            return None
        if self.one_line and (char := control_char(value)) is not None:
            self.problem(key, not_one_line(value, char))
            return None
        return value

    def convert(self, key: str, convert: Callable[[Any], T], what: str, expected: str, default: Any = MISSING,
                kind: type = str) -> T | None:
        """A TOML value of type ``kind`` turned into a Python object by ``convert``.

        ``convert`` raises ValueError when the value is malformed; a message of its own that starts
        with "(" replaces the generic "(expected ...)".
        """
        raw = self.get(key, kind, default, what)
        if raw is None or raw is default:
            return raw  # Any: the default, or None after a reported problem
        try:
            return convert(raw)
        except (ValueError, TypeError) as err:
            reason = str(err) if str(err).startswith("(") else f"(expected {expected})"
            self.problem(key, f"{shown(raw)} is not {what} {reason}")
            return None

    def positive(self, key: str, kind: type = int, default: Any = MISSING, maximum: int = MAX_INT) -> Any:
        """A positive number; an integer at most ``maximum`` (TOML's reach 2**63: a typo, not a size or count)."""
        what = f"a positive {'number' if kind is float else 'integer'}"
        value = self.get(key, kind, default, what)
        if value is not None and not 0 < value < math.inf:  # also refuses TOML's nan and inf
            self.problem(key, f"{shown(value)} is out of range (expected {what})")
            return None
        if kind is int and value is not None and value > maximum:
            self.problem(key, f"{shown(value)} is out of range (expected {what}, at most {maximum})")
            return None
        return value

    def table_of(self, key: str, required: bool = True) -> dict[str, Any] | None:
        """The sub-table ``key``; None (and a problem when required) if it is missing or not a table."""
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if required and not self.absent:
                self.problems.append(Problem(self.locate(self.table, ""),
                                             f"table '[{self.where(key)}]' is missing"))
            return None
        if not isinstance(value, dict):
            self.problem(key, f"{shown(value)} is {type_of(value)} (expected a table [{self.where(key)}])")
            return None
        return value

    def sub(self, key: str, required: bool = True) -> TableReader:
        table = self.table_of(key, required)
        return TableReader(table or {}, self.where(key), self.locate, self.problems, absent=table is None,
                           one_line=self.one_line)

    def check_unknown(self) -> None:
        for key in sorted(set(self.data) - self.used):
            self.problem(key, f"unknown key (expected one of: {', '.join(sorted(self.used))})")


def control_char(value: Any) -> str | None:
    """The first control character of a string, or of a list's strings; None if there is none."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and (m := _CONTROL.search(text)):
            return m[0]
    return None


def not_one_line(value: Any, char: str) -> str:
    return (f"{shown(value)} holds the control character {char!r} (expected text on one line, without control"
            " characters such as newline or tab)")


def locator(path: str, text: str) -> Locate:
    """Find the line and column of ``key`` inside table ``[table]``, so messages can point at it.

    A problem about a whole table (a key missing from it) points at its header; one about the top
    level at line 1. Keys tomllib accepts but this scan does not see (dotted keys, inline tables)
    fall back to their table's header.
    """
    header = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]")
    keyline = re.compile(r"\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=")
    index: dict[tuple[str, str], tuple[int, int]] = {("", ""): (1, 1)}
    current = ""
    for number, line in enumerate(text.split("\n"), 1):  # TOML's newlines only, unlike str.splitlines
        if m := header.match(line):
            # Quotes go, and the spaces around dots, but not what is quoted: [networks."dmz x"] is networks.dmz x.
            current = re.sub(r"\"([^\"]*)\"|'([^']*)'|\s", lambda q: q[1] or q[2] or "", m[1])
            index.setdefault((current, ""), (number, len(line) - len(line.lstrip()) + 1))
        elif m := keyline.match(line):
            index.setdefault((current, m[1].strip("\"'")), (number, m.start(1) + 1))

    def locate(table: str, key: str) -> Location:
        found = index.get((table, key)) or index.get((f"{table}.{key}" if table else key, "")) or index.get((table, ""))
        if found is None:  # e.g. [hosts.kvm0] written as an inline table: use the nearest enclosing table
            parent = table
            while found is None and parent:
                parent = parent.rpartition(".")[0]
                found = index.get((parent, ""))
        line, col = found or (1, 1)
        return Location(path, line, col)

    return locate



def read_toml(path: Path, what: str) -> tuple[dict[str, Any], str]:
    """The document and its text; a file that is not TOML is one problem with its line and column."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (give {what})") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a TOML file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        col = len(raw[raw.rfind(b"\n", 0, err.start) + 1:err.start].decode("utf-8", "replace")) + 1
        raise ConfigError([Problem(Location(str(path), line, col), f"byte {raw[err.start]:#04x} is not UTF-8"
                                   " (expected a UTF-8 TOML file)")]) from None
    # Editors on Windows may start the file with one, as cluster.conf may; TOML does not allow it. Dropped, it
    # shifts no column: an editor does not count it either.
    text = text.removeprefix(BOM)
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        if m := re.search(r" \(at line (\d+), column (\d+)\)$", message):
            location = Location(str(path), int(m[1]), int(m[2]))
        else:  # "(at end of document)"
            lines = text.split("\n")
            location = Location(str(path), len(lines), len(lines[-1]) + 1)
        message = re.sub(r" \(at [^)]*\)$", "", message)
    except ValueError:  # tomllib lets int() refuse an integer of more than 4300 digits
        number = re.search(r"[0-9_]{4000,}", text)
        start = number.start() if number else 0
        location = Location(str(path), text.count("\n", 0, start) + 1, start - text.rfind("\n", 0, start))
        message = "an integer is too long"
    raise ConfigError([Problem(location, f"not valid TOML: {message}")])

