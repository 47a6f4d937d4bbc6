"""Fuzzing the parsers: whatever the files hold, only ConfigError or UsageError may come out.

And every problem must say where it is: `path:LINE:COL: message` or, for a file as a whole,
`path: message`. Kept small enough for `make check` (a few seconds).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generators.errors import ConfigError, UsageError
from generators.validate import load_cluster
from tests.tools import ROOT

EXAMPLE_CONF = (ROOT / "cluster.conf").read_text()
EXAMPLE_SITE = (ROOT / "site.toml").read_text()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(conf: bytes, site: bytes | None = None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        conf_path, site_path = Path(directory, "cluster.conf"), Path(directory, "site.toml")
        conf_path.write_bytes(conf)
        site_path.write_bytes(EXAMPLE_SITE.encode() if site is None else site)
        try:
            cluster = load_cluster(conf_path, site_path)
        except ConfigError as err:
            assert err.problems, "a ConfigError must carry at least one problem"
            prefix = rf"({re.escape(str(conf_path))}|{re.escape(str(site_path))})"
            for line in str(err).split("\n"):
                assert re.match(rf"{prefix}(:[1-9]\d*:[1-9]\d*)?: \S", line), line
        except UsageError as err:
            assert str(err)
        else:
            assert all(vm.name and vm.host in cluster.site.hosts for vm in cluster.vms)


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_example(data: bytes) -> None:
    _check(EXAMPLE_CONF.encode() + data)


# Near-valid lines: each column drawn from real and almost-real values, then damaged.
_NUMBERS = ["1", "4", "16", "1024", "0", "-1", "1.5", "2147483647", "2147483648", "9" * 400, "9" * 5000, ""]
_COLUMN_VALUES = [
    ["web", "db", "new", "Web", "1x", "a-", "a" * 64, "provision", "compute1"],
    ["52:54:00:50:00:99", "52:54:00:50:00:21", "01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:AB:CD:EF", "zz"],
    ["192.168.50.99", "192.168.50.2", "192.168.50.1", "192.168.50.0", "192.168.50.255", "192.168.50.220",
     "192.168.60.9", "10.1.1.1", "999.1.1.1", "192.168.50.21"],
    _NUMBERS,
    _NUMBERS,
    _NUMBERS,
    ["-", "", "linux-servers", "linux-servers,web-servers", "a,,b", "nosuch", "x,x", "compute,nosuch,other"],
]
_OPTION_WORDS = [
    "host=kvm0", "host=kvm1", "host=auto", "host=kvm9", "host=", "install=pxe", "install=cloud", "install=none",
    "install=x", "os=bookworm", "os=x", "disk=qcow2", "disk=raw", "disk=lvm:vg0", "disk=lvm:", "net=lan", "net=dmz",
    "net=x", "boot=uefi", "boot=x", "cpuset=0-3", "cpuset=4", "cpuset=31", "cpuset=3-1", "cpuset=0-99999999999",
    "cpuset=1,1", "cpuset=4-7", "after=provision", "after=ldap,db", "after=web", "after=", "after=a,a",
    "autostart=no", "backup=yes", "keep=3", "keep=0", "=", "x=1", "host=kvm0=1", "kvm0",
]
_JUNK = st.sampled_from(["\r", " ", "\t", "\x00", "\ufeff", "\u00e9", "\x0b", "\x1c", "\u2028", "#", ",", "=", ":"])


@st.composite
def _near_valid_line(draw: st.DrawFn) -> str:
    fields = [draw(st.sampled_from(values)) for values in _COLUMN_VALUES]
    if draw(st.integers(0, 3)) == 0:  # one field of arbitrary text (drawing text for every field is slow)
        fields[draw(st.integers(0, len(fields) - 1))] = draw(st.text(max_size=8))
    words = draw(st.lists(st.sampled_from(_OPTION_WORDS), max_size=4))
    if words or draw(st.booleans()):
        fields.append(" ".join(words))
    if draw(st.integers(0, 4)) == 0:  # a field missing, or one too many
        at = draw(st.integers(0, len(fields) - 1))
        fields[at:at + 1] = [] if draw(st.booleans()) else [fields[at], fields[at]]
    line = draw(st.sampled_from(["\t", "\t", "\t", " ", "\t "])).join(fields)
    if draw(st.integers(0, 3)) == 0 and line:
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(_JUNK) + line[at:]
    return line


@FUZZ
@given(st.lists(_near_valid_line(), max_size=6), st.sampled_from(["\n", "\r\n", "\r"]))
def test_near_valid_lines(lines: list[str], newline: str) -> None:
    data = EXAMPLE_CONF + newline.join(lines) + "\n"
    _check(data.encode("utf-8", "surrogatepass"))


# site.toml: each value of the example replaced by another TOML value, or the text damaged.
_TOML_VALUES = st.sampled_from([
    "0", "-1", "1.5", "nan", "inf", "true", '""', '"x"', "[]", "[1]", '["a-b"]', "[[1]]", "{}", "{a = 1}",
    "1979-05-27", '"192.168.50.1"', '"192.168.50.0/24"', '"10.0.0.0/8"', '"kvm0"', '["192.168.50.5-192.168.50.9"]',
    '"qemu:///system"', "9" * 30, '"$6$x$y"', '"lan"', '"provision"',
])
_SITE_LINES = EXAMPLE_SITE.split("\n")


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_SITE_LINES) - 1), _TOML_VALUES), max_size=4))
def test_site_values_replaced(changes: list[tuple[int, str]]) -> None:
    lines = list(_SITE_LINES)
    for number, value in changes:
        key, equals, _ = lines[number].partition("=")
        if equals and not key.lstrip().startswith("#"):
            lines[number] = f"{key}= {value}"
        else:
            lines[number] = f"k{number} = {value}"  # an unknown key in whatever table this is
    _check(EXAMPLE_CONF.encode(), "\n".join(lines).encode())


@FUZZ
@given(st.integers(0, len(EXAMPLE_SITE)), st.integers(0, 40), st.binary(max_size=20))
def test_site_text_damaged(at: int, cut: int, junk: bytes) -> None:
    data = EXAMPLE_SITE.encode()
    _check(EXAMPLE_CONF.encode(), data[:at] + junk + data[at + cut:])
