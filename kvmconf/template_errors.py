"""Where a jinja2 template went wrong, as an admin needs it: the template's file and line, not a traceback.

jinja2 gives the line of a syntax error on the exception, and for an error while rendering (an undefined name
under StrictUndefined, a division by zero) rewrites the traceback so that the template's own lines are frames of
its file; neither gives a column. A message names the file as the admin can open it from where they ran kvmconf.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError


@dataclass(frozen=True)
class TemplateFault:
    path: Path  # the template the error is in: the one rendered, or one it includes
    line: int
    message: str

    def __str__(self) -> str:
        return f"{shown_path(self.path)}:{self.line}: {self.message}"

    def is_in(self, template: Path) -> bool:
        """Whether the error is in ``template`` itself (not in one it includes)."""
        return _same(self.path, template)


def shown_path(path: Path) -> str:
    """``path`` as messages show it: relative to the current directory when inside it (hosts/x/recipe.toml, as
    the admin types it from the repository), else as it is (/tmp/rec/x/recipe.toml from $KVMCONF_RECIPES)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def template_fault(err: Exception, root: Path) -> TemplateFault | None:
    """Where in a template below ``root`` ``err`` was raised; None if not by a template there (a bug of the code
    the template called keeps its traceback, and a template that is not there has no line)."""
    if isinstance(err, TemplateSyntaxError):  # TemplateAssertionError too (an unknown filter)
        if err.filename and _below(err.filename, root):
            return TemplateFault(Path(err.filename), err.lineno, err.message or str(err))
        return None
    stack = traceback.extract_tb(err.__traceback__)
    frames = [frame for frame in stack if _below(frame.filename, root)]
    if not frames or frames[-1].lineno is None:
        return None
    # Another exception than jinja2's is the template's own only if its last frame is the template's line:
    # `{{ vm.ram / 0 }}`, not a kvmconf property the template read.
    if not isinstance(err, TemplateError) and stack[-1] != frames[-1]:
        return None
    message = str(err) if isinstance(err, TemplateError) else f"{type(err).__name__}: {err}"
    return TemplateFault(Path(frames[-1].filename), frames[-1].lineno, message)


# jinja2 names a file os.path.normpath(root/name): paths are compared in that spelling (KVMCONF_RECIPES=x/../y).
def _below(filename: str | Path, root: Path) -> bool:
    return Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(root))


def _same(one: str | Path, other: str | Path) -> bool:
    return os.path.abspath(one) == os.path.abspath(other)
