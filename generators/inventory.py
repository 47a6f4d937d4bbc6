"""Read cluster.conf into rows of typed fields, each value remembering its column.

Only what one line can tell is checked here (field count, each value's syntax, option keys);
checks across lines and against site.toml are in ``validate.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from generators.columns import COLUMNS, LABEL, OPTIONS, OPTIONS_BY_KEY, REQUIRED_COLUMNS, FieldError
from generators.errors import Location, Problem, UsageError, shown

_FIELD_NAMES = " ".join(c.name for c in COLUMNS[:REQUIRED_COLUMNS]) + " [options]"
_OPTION_KEYS = ", ".join(o.key for o in OPTIONS)
_WORDS = re.compile(r"\S+")
BOM = "\ufeff"  # the byte-order mark some editors put first; cluster.conf may start with one


@dataclass
class Row:
    """One VM line: parsed values and the 1-based column where each started."""

    line: int
    values: dict[str, Any] = field(default_factory=dict)  # column name -> parsed value
    cols: dict[str, int] = field(default_factory=dict)  # column name -> column
    options: dict[str, Any] = field(default_factory=dict)  # option key -> parsed value
    option_cols: dict[str, int] = field(default_factory=dict)  # option key -> column of "key="
    repeat_cols: dict[str, list[int]] = field(default_factory=dict)  # repeatable option -> column of each
    ok: bool = True  # False when a field failed; such rows are left out of checks that need a whole VM
    # A line that could not be split into fields (or read as UTF-8): its first word, when that is a VM name. Only
    # after= uses it, so that one such line does not make every VM deployed after it name a VM "not defined above".
    unsplit_name: str | None = None


class Line(NamedTuple):
    number: int
    text: str  # without its line ending; U+FFFD where it is not UTF-8
    utf8: bool  # False: said as a problem already, and only its VM's name is read (see Row.unsplit_name)


def read_text(path: Path) -> tuple[list[Line], list[Problem]]:
    """The file's lines; undecodable ones become problems, and are still given (decoded with U+FFFD)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (give the inventory with --cluster, CLUSTER=... or"
                         " KVMCONF_CLUSTER)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a cluster.conf file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot be read: {err.strerror}") from None
    where = str(path)
    if b"\0" in data:
        # A binary file would give one problem per "line"; the first NUL says it all.
        before = data[:data.index(b"\0")]
        line = before.count(b"\n") + 1
        col = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        return [], [Problem(Location(where, line, col), "contains a NUL byte: this is not a text file"
                            " (expected tab-separated UTF-8 text)")]
    lines: list[Line] = []
    problems: list[Problem] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            col = len(raw[:err.start].decode("utf-8", "replace")) + 1
            problems.append(Problem(Location(where, number, col),
                                    f"byte {raw[err.start]:#04x} is not UTF-8 text (expected a tab-separated"
                                    " UTF-8 text file)"))
            lines.append(Line(number, raw.decode("utf-8", "replace"), utf8=False))
            continue
        if number == 1:
            text = text.removeprefix(BOM)  # editors on Windows may start the file with one
        text = text.removesuffix("\r")  # CRLF files from Windows editors are fine
        if "\r" in text:  # a file of CR-ended lines would be one line: a comment, or a VM with all the others in it
            problems.append(Problem(Location(where, number, text.index("\r") + 1),
                                    "holds a carriage return (CR) inside the line (expected lines ending in LF or"
                                    " CR LF: save the file as Unix or Windows text)"))
        lines.append(Line(number, text, utf8=True))
    return lines, problems


def read_rows(path: Path) -> tuple[list[Row], list[Problem]]:
    lines, problems = read_text(path)
    rows: list[Row] = []
    for number, text, utf8 in lines:
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not utf8:  # said by read_text: only its VM's name is read, for after= (see Row)
            rows.append(Row(number, ok=False, unsplit_name=_first_word_if_name(stripped)))
            continue
        rows.append(_parse_line(str(path), number, text, problems))
    if not rows and not problems:
        problems.append(Problem(Location(str(path), 1, 1),
                                f"no VMs defined (expected one tab-separated line per VM: {_FIELD_NAMES})"))
    return rows, problems


def _parse_line(path: str, number: int, text: str, problems: list[Problem]) -> Row:
    row = Row(number)
    fields = text.split("\t")
    if not REQUIRED_COLUMNS <= len(fields) <= len(COLUMNS):
        col, hint = 1, ""
        blank = _blank_tail(fields)
        if len(fields) < REQUIRED_COLUMNS and " " in text:
            hint = "; fields must be separated by tabs, not spaces"
        elif blank and len(fields) - blank <= len(COLUMNS):
            # Nothing but tabs (and blanks) after the last value: invisible in an editor, so said, and where.
            col = len("\t".join(fields[:len(fields) - blank])) + 1
            tabs, them = ("a tab", "it") if blank == 1 else ("tabs", "them")
            hint = f"; the line ends with {tabs} after the {COLUMNS[len(fields) - blank - 1].name}: remove {them}"
        elif len(fields) > len(COLUMNS):
            hint = "; options are separated by spaces, not tabs"
        count = f"{len(fields)} tab-separated field{'s' * (len(fields) != 1)}"
        problems.append(Problem(Location(path, number, col),
                                f"found {count} (expected {REQUIRED_COLUMNS} or {len(COLUMNS)}: {_FIELD_NAMES}){hint}"))
        row.ok = False
        row.unsplit_name = _first_word_if_name(text)
        return row
    col = 1
    for column, value in zip(COLUMNS, fields, strict=False):
        row.cols[column.name] = col
        if column.name == "options":
            _parse_options(path, number, col, value, row, problems)
        else:
            try:
                row.values[column.name] = column.parse(value)
            except FieldError as err:
                hint = _space_hint(value.strip())
                problems.append(Problem(Location(path, number, col),
                                        f"column '{column.name}': {shown(value)} {err}{hint}"))
                row.ok = False
        col += len(value) + 1
    return row


def _space_hint(value: str) -> str:
    """Why a field with a space inside may be wrong: spaces only beside commas are a list written as prose (the
    hostgroups column), others most likely two fields with a space where a tab belongs."""
    if " " not in value:
        return ""
    if not re.sub(r" *, *", ",", value).count(" "):
        return " (a comma list has no spaces around its commas)"
    return " (fields are separated by tabs; is one missing?)"


def _first_word_if_name(text: str) -> str | None:
    """The first word of a line that could not be read into fields, when it is a VM name (Row.unsplit_name)."""
    first_word = text.split(None, 1)[0]
    return first_word if LABEL.fullmatch(first_word) else None


def _blank_tail(fields: list[str]) -> int:
    """How many fields at the end of a line are blank, the required columns left out: one per trailing tab."""
    blank = 0
    for value in reversed(fields[REQUIRED_COLUMNS:]):
        if value.strip():
            break
        blank += 1
    return blank


def _parse_options(path: str, number: int, start: int, text: str, row: Row, problems: list[Problem]) -> None:
    repeated: dict[str, list[Any]] = {}  # a repeatable option's values, made a tuple once the line is read
    for match in _WORDS.finditer(text):
        word, col = match[0], start + match.start()
        where = Location(path, number, col)
        key, sep, value = word.partition("=")
        option = OPTIONS_BY_KEY.get(key)
        if not sep or option is None:
            what = f"unknown option {shown(key)}" if sep else f"{shown(word)} is not a key=value option"
            problems.append(Problem(where, f"column 'options': {what} (expected one of: {_OPTION_KEYS})"))
            row.ok = False
        elif option.repeatable:
            row.option_cols.setdefault(key, col)
            row.repeat_cols.setdefault(key, []).append(col)
            try:
                repeated.setdefault(key, []).append(option.parse(value))
            except FieldError as err:
                expected = "" if "(expected" in str(err) else f" (expected {option.values})"
                problems.append(Problem(where, f"column 'options': option {key!r}: {shown(value)} {err}{expected}"))
                row.ok = False
        elif key in row.option_cols:
            problems.append(Problem(where, f"column 'options': option {key!r} is given twice (expected it once)"))
            row.ok = False
        else:
            row.option_cols[key] = col
            try:
                row.options[key] = option.parse(value)
            except FieldError as err:
                expected = "" if "(expected" in str(err) else f" (expected {option.values})"
                problems.append(Problem(where, f"column 'options': option {key!r}: {shown(value)} {err}{expected}"))
                row.ok = False
    row.options.update((key, tuple(values)) for key, values in repeated.items())
