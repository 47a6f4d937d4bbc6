"""Deterministic NoCloud seed ISOs: ISO9660 + Joliet + Rock Ridge, volume id `cidata`.

cloud-init finds the seed by its label (`blkid -t LABEL=cidata`) and reads `user-data`, `meta-data` and
`network-config` by their Rock Ridge names; Joliet names are there for Windows-style readers, like
`genisoimage -volid cidata -joliet -rock`, which the NoCloud docs show.

Two things this module adds to a plain pycdlib build:

* Determinism. pycdlib stamps ``time.time()`` into the volume descriptors and every directory record
  (and re-stamps the modification date while writing), through ``time.localtime`` so the machine's
  time zone leaks in too. While an image is built, the ``time`` name inside pycdlib's modules is
  swapped for a frozen clock at :data:`EPOCH` that reports UTC, so the same files give the same bytes
  on any machine, on any day.
* Speed. A pycdlib build costs ~0.7 ms, too much for a 10,000-VM build. The layout of an image
  depends only on the three files' lengths, so one image is built with pycdlib per distinct set of
  lengths (a "skeleton", kept in a small cache) and each VM's image is that skeleton with the files'
  bytes copied over the placeholders. tests/test_cloud_init.py checks the splice against a full
  pycdlib build for many contents.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from time import struct_time
from types import ModuleType
from typing import Any

import pycdlib

VOLUME_ID = "cidata"
FILE_NAMES = ("user-data", "meta-data", "network-config")  # the order of the contents passed in
EPOCH = 315532800.0  # 1980-01-01T00:00:00Z, the date reproducible-build tools use for zip/ISO entries
SECTOR = 2048

_clock_lock = threading.Lock()


class _FrozenClock:
    """Stands in for the ``time`` module inside pycdlib: a fixed now, and local time = UTC."""

    def time(self) -> float:
        return EPOCH

    def localtime(self, seconds: float | None = None) -> struct_time:
        return time.gmtime(EPOCH if seconds is None else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextmanager
def frozen_pycdlib_clock() -> Iterator[None]:
    """Make every pycdlib module see :class:`_FrozenClock` as ``time`` (one build at a time)."""
    with _clock_lock:
        patched: list[ModuleType] = [
            module for name, module in list(sys.modules.items())
            if (name == "pycdlib" or name.startswith("pycdlib.")) and getattr(module, "time", None) is time
        ]
        clock = _FrozenClock()
        for module in patched:
            module.time = clock  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for module in patched:
                module.time = time  # type: ignore[attr-defined]


def _iso9660_name(name: str) -> str:
    # Level 3 allows 30 d-characters: USER_DATA.;1 — only readers without Rock Ridge or Joliet see it.
    return "/" + name.upper().replace("-", "_") + ".;1"


def pycdlib_image(contents: Sequence[bytes]) -> tuple[bytes, tuple[int, ...]]:
    """A whole image built by pycdlib, and the byte offset of each file's data in it."""
    iso = pycdlib.PyCdlib()
    with frozen_pycdlib_clock():
        iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
        for name, data in zip(FILE_NAMES, contents, strict=True):
            iso.add_fp(io.BytesIO(data), len(data), _iso9660_name(name), rr_name=name, joliet_path="/" + name)
        out = io.BytesIO()
        iso.write_fp(out)
        offsets = tuple(iso.get_record(rr_path="/" + name).extent_location() * SECTOR for name in FILE_NAMES)
        iso.close()
    return out.getvalue(), offsets


@lru_cache(maxsize=256)
def _skeleton(lengths: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]]:
    # Distinct bytes per file, so a layout that shared extents between files could not go unnoticed.
    placeholders = [bytes([0x41 + i]) * length for i, length in enumerate(lengths)]
    image, offsets = pycdlib_image(placeholders)
    for placeholder, offset in zip(placeholders, offsets, strict=True):
        if image[offset:offset + len(placeholder)] != placeholder:
            raise RuntimeError("programming error: pycdlib laid out the seed ISO differently than expected")
    return image, offsets


def seed_iso(user_data: bytes, meta_data: bytes, network_config: bytes) -> bytes:
    """The NoCloud seed image holding these three files (same input, same bytes)."""
    contents = (user_data, meta_data, network_config)
    image, offsets = _skeleton(tuple(len(data) for data in contents))
    buffer = bytearray(image)
    for data, offset in zip(contents, offsets, strict=True):
        buffer[offset:offset + len(data)] = data
    return bytes(buffer)
