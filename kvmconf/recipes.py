"""The deploy recipes of hosts/: what each VM gets (packages, files, services, hooks), rendered from the cluster.

Layout (see README, "Deploy recipes")::

    hosts/group/<hostgroup>/recipe.toml   shared by every VM in that hostgroup
    hosts/<vm>/recipe.toml                that VM only (applied after its groups)

A recipe.toml holds ``packages = [...]``, ``hooks = ["hooks/x.sh", ...]`` (run on deploy, in order) and
``[[file]]`` tables: ``dest`` (absolute path on the VM), exactly one of ``template`` (a jinja2 file next to
the recipe, rendered with ``cluster``, ``site``, ``vm`` and ``banner``) or ``build`` (a generated file or
directory of build/, rendered in memory so it can never be stale), plus ``owner``, ``group``, ``mode`` and
``reload`` (services reloaded when this file changes). Any other key, a value of the wrong type (a string for
a list, a number for a mode) and one of the wrong form (a user name with a space, a template path outside the
recipe's directory) are refused all at once, each with its line, before anything is rendered or pushed.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound

from generators.errors import Problem
from generators.locations import CHECKOUT
from generators.model import Cluster, Vm
from generators.toml_reader import Locate, TableReader, locator
from kvmconf.errors import KvmconfError
from kvmconf.template_errors import TemplateFault, shown_path, template_fault

RECIPE_DIR = CHECKOUT / "hosts"
RECIPE = "recipe.toml"
# What a remote path, user, package or service may look like: no shell metacharacters, no whitespace,
# so a name can never be taken for an option or split by a shell even before shlex.quote.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._@+/-]*")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+:-]*")
_MODE = re.compile(r"0?[0-7]{3,4}")
# A file next to the recipe (template, hook) or below build/: relative, so it cannot name /etc/shadow of the
# machine running kvmconf, and without . or .. parts (checked in _form), so it cannot climb out either.
_RELATIVE_PATH = re.compile(r"[A-Za-z0-9._@+-]+(?:/[A-Za-z0-9._@+-]+)*")
_NEXT_TO_RECIPE = "a relative path below the recipe's directory, without .."
_NAME_RULE = "letters, digits and . _ @ + : -, starting with a letter or digit"
_PATH_RULE = "/ then letters, digits and . _ @ + / -, without .."


def _form(pattern: re.Pattern[str]) -> Callable[[str], str]:
    """A check for TableReader.convert: ValueError unless ``value`` matches and has no . or .. path part."""
    def check(value: str) -> str:
        if not pattern.fullmatch(value) or {".", ".."} & set(value.split("/")):
            raise ValueError(value)
        return value
    return check


_absolute_path = _form(_SAFE_PATH)


def _account_name(value: str) -> str:
    """A user or group name: chown would take a number for an id, which push compares with the name stat gives,
    so the file would differ on every run, be pushed again and its services reloaded each time."""
    if value.isdigit():
        raise ValueError("(a number, which chown takes for an id while the VM's files are compared by name: the"
                         " file would be pushed again on every run; give the name, such as \"root\")")
    return _form(_SAFE_NAME)(value)


def _form_or_template(check: Callable[[str], str]) -> Callable[[str], str]:
    """``check``, unless the value holds a jinja expression: its form is only known once rendered for a VM."""
    return lambda value: value if "{" in value else check(value)


@dataclass(frozen=True)
class Field:
    kind: type
    what: str  # what messages say is allowed
    form: Callable[[str], str]  # the value's (or for a list, each item's) form beyond its type
    rule: str  # that form, for messages
    required: bool = False


# Every key a recipe may hold, with its TOML type and what messages say is allowed: any other key is a typo
# (`pakages`, `mod`) that would silently drop what it meant, and a string where a list belongs would be taken
# letter by letter (`packages = "slapd"` would install s, l, a, p and d).
RECIPE_TYPES: dict[str, Field] = {
    "packages": Field(list, "a list of package names", form=_form(_SAFE_NAME), rule=_NAME_RULE),
    "hooks": Field(list, 'a list of hook scripts such as "hooks/x.sh"', form=_form(_RELATIVE_PATH),
                   rule=_NEXT_TO_RECIPE),
}
FILE_TYPES: dict[str, Field] = {
    # dest is the one key a [[file]] cannot do without; one with {{ }} is checked once rendered (_rendered_dest).
    "dest": Field(str, "an absolute path on the VM", required=True, form=_form_or_template(_absolute_path),
                  rule=_PATH_RULE),
    "template": Field(str, "a template file next to the recipe", form=_form(_RELATIVE_PATH), rule=_NEXT_TO_RECIPE),
    "build": Field(str, "a generated file or directory of build/", form=_form(_RELATIVE_PATH),
                   rule="a relative path below build/, without .."),
    "owner": Field(str, "a user name", form=_account_name, rule=_NAME_RULE),
    "group": Field(str, "a group name", form=_account_name, rule=_NAME_RULE),
    "mode": Field(str, 'an octal mode in quotes such as "0644"', form=_form(_MODE), rule="3 or 4 octal digits"),
    "reload": Field(list, "a list of service names", form=_form(_SAFE_NAME), rule=_NAME_RULE),
}
RECIPE_KEYS = (*RECIPE_TYPES, "file")  # [[file]] tables, each checked against FILE_TYPES
FILE_KEYS = tuple(FILE_TYPES)
# A [[file]] table's header: each table's keys are looked up from there, not in the first table that has them.
_FILE_HEADER = re.compile(r"\s*\[\[\s*file\s*\]\]")


@dataclass(frozen=True)
class FileSpec:
    dest: str
    content: bytes
    owner: str = "root"
    group: str = "root"
    mode: str = "0644"
    reload: tuple[str, ...] = ()
    source: str = ""  # where it came from, for messages


@dataclass(frozen=True)
class Hook:
    name: str  # recipe-relative, e.g. mcp/hooks/10-nagios.sh
    content: bytes


@dataclass(frozen=True)
class Recipe:
    vm: str
    packages: tuple[str, ...]
    files: tuple[FileSpec, ...]
    hooks: tuple[Hook, ...]


class RecipeError(KvmconfError):
    """A recipe under hosts/ is malformed or its template fails to render."""


@cache
def environment(root: Path) -> Environment:
    # The same options as generators/render.py (StrictUndefined above all), rooted at hosts/.
    return Environment(loader=FileSystemLoader(root), undefined=StrictUndefined, keep_trailing_newline=True,
                       trim_blocks=True, lstrip_blocks=True, autoescape=False)


def _recipe_dirs(vm: Vm, root: Path) -> list[Path]:
    dirs = [root / "group" / group for group in vm.hostgroups] + [root / vm.name]
    return [d for d in dirs if (d / RECIPE).is_file()]


def unused_recipes(cluster: Cluster, root: Path = RECIPE_DIR) -> list[str]:
    """A note for each recipe that applies to no VM of `cluster`: a misspelt directory (hosts/ladp/) would
    otherwise be skipped without a word, and its VM deployed without it. Notes, not errors: clusters that
    share one hosts/ each leave the others' recipes unused."""
    names = {vm.name for vm in cluster.vms}
    notes = [f"{shown_path(path)}: note: no VM of {cluster.source} is named {path.parent.name}: this recipe is not"
             " deployed" for path in sorted(root.glob(f"*/{RECIPE}")) if path.parent.name not in names]
    notes += [f"{shown_path(path)}: note: no VM of {cluster.source} is in hostgroup {path.parent.name}: this"
              " recipe is not deployed" for path in sorted(root.glob(f"group/*/{RECIPE}"))
              if path.parent.name not in cluster.hostgroups]
    return notes


def recipe_for(cluster: Cluster, vm: Vm, build_tree: Callable[[], dict[PurePosixPath, str | bytes]],
               root: Path = RECIPE_DIR) -> Recipe:
    """Everything ``vm`` gets, groups first; a later recipe's file for the same dest replaces the earlier."""
    packages: list[str] = []
    files: dict[str, FileSpec] = {}
    hooks: list[Hook] = []
    for directory in _recipe_dirs(vm, root):
        where = shown_path(directory / RECIPE)  # the file itself, wherever $KVMCONF_RECIPES puts the recipes
        text = (directory / RECIPE).read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{where}: {err}") from None
        locators = _refuse_bad_keys_and_values(data, text, where)
        packages += [package for package in data.get("packages", []) if package not in packages]
        for entry, locate in zip(data.get("file", []), locators, strict=True):
            for spec in _files(cluster, vm, entry, directory, root, build_tree, where, locate):
                files[spec.dest] = spec
        for hook in data.get("hooks", []):
            name = str((directory / hook).relative_to(root))  # relative and without ..: checked above
            named_at = f"{locator(where, text)('', 'hooks')}: key 'hooks'"
            hooks.append(Hook(name, _render(root, name, cluster, vm, named_at).encode()))
    return Recipe(vm.name, tuple(packages), tuple(files.values()), tuple(hooks))


def _strings(value: list[Any]) -> list[str]:
    if not all(isinstance(item, str) for item in value):
        raise ValueError('(expected strings in quotes, such as ["a", "b"])')
    return value


def _check_types(r: TableReader, fields: dict[str, Field]) -> None:
    """Each key of ``r``'s table that has the wrong TOML type (or, in a list, an item that is not a string), or is
    required and missing."""
    for key, field in fields.items():
        default = {} if field.required else {"default": None}  # no default: TableReader reports the key missing
        if field.kind is list:
            r.convert(key, _each(field), field.what, field.what, kind=list, **default)
        else:
            r.convert(key, field.form, field.what, field.rule, kind=field.kind, **default)


def _each(field: Field) -> Callable[[list[Any]], list[str]]:
    """A list's check: strings only, each of ``field``'s form; a message names the first item that is not."""
    def check(value: list[Any]) -> list[str]:
        for item in _strings(value):
            try:
                field.form(item)
            except ValueError:
                raise ValueError(f"({item!r}: expected {field.rule})") from None
        return value
    return check


def _refuse_bad_keys_and_values(data: dict[str, Any], text: str, where: str) -> list[Locate]:
    """Every key that is not a recipe's, has the wrong type or a value of the wrong form, all at once and each
    with its line (tomllib gives none: site.toml's locator finds it, and site.toml's reader words the problems).
    Returns the locator of each [[file]] table, for the problems only rendering finds."""
    locate = locator(where, text)
    problems = [Problem(locate("", key), f"key '{key}': unknown key (expected one of: {', '.join(RECIPE_KEYS)})")
                for key in data if key not in RECIPE_KEYS]
    _check_types(TableReader(data, "", locate, problems), RECIPE_TYPES)
    entries = data.get("file", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        problems.append(Problem(locate("", "file"), "key 'file': expected [[file]] tables"))
        entries = []
    locators = _file_locators(where, text, len(entries))
    for entry, locate_entry in zip(entries, locators, strict=True):
        problems += [Problem(locate_entry("file", key), f"key 'file.{key}': unknown key (expected one of:"
                                                        f" {', '.join(FILE_KEYS)})")
                     for key in entry if key not in FILE_KEYS]
        _check_types(TableReader(entry, "file", locate_entry, problems), FILE_TYPES)
        if ("template" in entry) == ("build" in entry):
            problems.append(Problem(locate_entry("file", ""), "[[file]] table: give exactly one of template = ..."
                                                              " or build = ..."))
    if problems:
        raise RecipeError("\n".join(str(problem) for problem in sorted(set(problems))))
    return locators


def _file_locators(where: str, text: str, count: int) -> list[Locate]:
    """One locator per [[file]] table: the line of its own key, not of the first table with a key of that name."""
    lines = text.split("\n")  # TOML's newlines only, as the locator counts them
    starts = [number for number, line in enumerate(lines) if _FILE_HEADER.match(line)]
    if len(starts) != count:  # file = [{...}] inline tables: the scan sees no key inside them, so all are at `file`
        at_file = locator(where, text)("", "file")
        return [lambda table, key: at_file] * count
    ends = [*starts[1:], len(lines)] if starts else []
    # Blank lines before the table keep its line numbers those of the file.
    return [locator(where, "\n" * start + "\n".join(lines[start:end])) for start, end in zip(starts, ends, strict=True)]


def _render(root: Path, name: str, cluster: Cluster, vm: Vm, named_at: str) -> str:
    """Template ``name`` of ``root`` rendered for ``vm``; ``named_at`` is the recipe key naming it, for messages.

    An error in the template is a RecipeError naming the template's file and line (of the template it includes,
    if it is there), the VM and that key; one of the code a template calls stays a bug, with its traceback."""
    # The banner names hosts/ whatever the root: it is part of the file pushed, which must not change with it.
    banner = [f"Generated by kvmconf from {cluster.source}, {cluster.site.path} and hosts/{name}.",
              "Do not edit: change those files and run `fab update-confs`."]
    try:
        return environment(root).get_template(name).render(cluster=cluster, site=cluster.site, vm=vm, banner=banner)
    except Exception as err:
        # The one recipe.toml names is missing; one that it includes has a line there, as any other fault.
        if isinstance(err, TemplateNotFound) and err.name == name:
            raise RecipeError(f"{named_at}: {shown_path(root / name)} does not exist") from None
        fault = template_fault(err, root)
        if fault is None:
            raise
        raise RecipeError(_fault_message(fault, root / name, vm, named_at)) from None


def _fault_message(fault: TemplateFault, rendered: Path, vm: Vm, named_at: str) -> str:
    which = "it" if fault.is_in(rendered) else shown_path(rendered)
    return f"{fault} (rendering {which} for VM {vm.name}; {named_at})"


def _rendered_dest(cluster: Cluster, vm: Vm, raw: str, root: Path, locate: Locate) -> str:
    """dest, its jinja expressions rendered for ``vm`` (e.g. "{{ site.provision.config_dir }}/dnsmasq"), then
    checked like a plain one: only now is its form known."""
    if "{" not in raw:
        return raw  # checked with the other values
    key = f"{locate('file', 'dest')}: key 'file.dest'"
    try:
        dest = environment(root).from_string(raw).render(cluster=cluster, site=cluster.site, vm=vm)
    except TemplateError as err:
        raise RecipeError(f"{key}: {raw!r}: {err} (rendering it for VM {vm.name})") from None
    try:
        return _absolute_path(dest)
    except ValueError:
        raise RecipeError(f"{key}: {raw!r} renders as {dest!r} for {vm.name}, which is not"
                          f" {FILE_TYPES['dest'].what} (expected {_PATH_RULE})") from None


def _files(cluster: Cluster, vm: Vm, entry: dict[str, Any], directory: Path, root: Path,
           build_tree: Callable[[], dict[PurePosixPath, str | bytes]], where: str, locate: Locate) -> list[FileSpec]:
    """The files of one [[file]] table, whose values _refuse_bad_keys_and_values has checked."""
    dest = _rendered_dest(cluster, vm, entry["dest"], root, locate)
    common: dict[str, Any] = dict(owner=entry.get("owner", "root"), group=entry.get("group", "root"),
                                  mode=entry.get("mode", "0644"), reload=tuple(entry.get("reload", [])))
    if "template" in entry:
        name = str((directory / entry["template"]).relative_to(root))  # relative and without ..: checked above
        named_at = f"{locate('file', 'template')}: key 'file.template'"
        return [FileSpec(dest, _render(root, name, cluster, vm, named_at).encode(), source=shown_path(root / name),
                         **common)]
    # A build path names a file or a directory of build/; a directory is copied as a tree under dest.
    wanted = PurePosixPath(entry["build"])
    tree = build_tree()
    if wanted in tree:
        return [FileSpec(dest, _bytes(tree[wanted]), source=f"build/{wanted}", **common)]
    inside = sorted(p for p in tree if wanted in p.parents)
    if not inside:
        raise RecipeError(f"{where}: file {dest}: build/{wanted} is not a generated file or directory")
    return [FileSpec(str(PurePosixPath(dest) / p.relative_to(wanted)), _bytes(tree[p]), source=f"build/{p}", **common)
            for p in inside]


def _bytes(content: str | bytes) -> bytes:
    return content if isinstance(content, bytes) else content.encode()
