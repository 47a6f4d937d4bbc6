"""Golden-file comparison: tests/golden/<name>/<path>, rewritten with `pytest --regenerate`.

Text files are compared as text with a unified diff on failure; binary files (ISO images) by
their SHA-256, stored as `<path>.sha256`, to keep the repository small.
"""

from __future__ import annotations

import difflib
import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def _expected_files(tree: Mapping[PurePosixPath, str | bytes]) -> dict[str, bytes]:
    files = {}
    for path, content in tree.items():
        if isinstance(content, bytes):
            files[f"{path}.sha256"] = (hashlib.sha256(content).hexdigest() + "\n").encode()
        else:
            files[str(path)] = content.encode()
    return files


def assert_golden(name: str, tree: Mapping[PurePosixPath, str | bytes], regenerate: bool) -> None:
    """Compare a generator's whole output with tests/golden/<name>/ (no file missing, none extra)."""
    root = GOLDEN_DIR / name
    actual = _expected_files(tree)
    if regenerate:
        shutil.rmtree(root, ignore_errors=True)
        for path, content in actual.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(content)
        return
    if not root.is_dir():
        pytest.fail(f"no golden files for {name!r}: run `make check PYTEST_ARGS=--regenerate` and review them")
    stored = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    problems = []
    for path in sorted(set(stored) | set(actual)):
        if path not in actual:
            problems.append(f"{path}: golden file is no longer generated")
        elif path not in stored:
            problems.append(f"{path}: generated but has no golden file")
        elif stored[path] != actual[path]:
            diff = difflib.unified_diff(stored[path].decode(errors="replace").splitlines(),
                                        actual[path].decode(errors="replace").splitlines(),
                                        f"golden/{name}/{path}", "generated", lineterm="")
            problems.append("\n".join(diff))
    if problems:
        pytest.fail(f"output of {name!r} differs from tests/golden/{name} (regenerate with --regenerate"
                    " if intended):\n" + "\n".join(problems))
