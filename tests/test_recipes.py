"""Fast checks of the deploy building blocks: recipes, waves, quoting, and ssh config resolution."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from generators import ssh_config
from generators.model import Cluster
from kvmconf.deploy import Options, recipes, run_cluster, waves
from kvmconf.recipes import RECIPE_DIR, RecipeError, unused_recipes
from kvmconf.remote import command, resolve, script


def test_example_recipes(example: Cluster) -> None:
    planned = recipes(example, example.vms)
    mcp = {f.dest: f for f in planned["mcp"].files}
    assert planned["mcp"].packages == ("openssh-server", "nagios4")
    assert mcp["/etc/nagios4/conf.d/kvmconf/hostgroups.cfg"].reload == ("nagios4",)
    assert [h.name for h in planned["mcp"].hooks] == ["mcp/hooks/nagios-localhost.sh"]
    # provision gets the packages `invoke provision-server` needs, run there; it alone deploys dnsmasq and TFTP.
    assert {"dnsmasq-base", "pxelinux", "syslinux-common", "grub-efi-amd64-bin", "grub-common",
            "debian-installer-12-netboot-amd64", "python3-venv"} <= set(planned["provision"].packages)
    assert "dnsmasq" not in planned["provision"].packages
    assert {f.dest for f in planned["provision"].files} == {"/etc/motd", "/etc/hosts"}
    assert b"192.168.50.20\tdb.phys.example.org db\n" in {f.dest: f for f in planned["web"].files}["/etc/hosts"].content
    assert planned["scratch"].files == () and planned["scratch"].packages == ()


def test_a_dest_may_use_site_and_a_build_directory_gives_a_file_each(example: Cluster, tmp_path: Path) -> None:
    hosts = Path(shutil.copytree(RECIPE_DIR, tmp_path / "hosts"))
    (hosts / "db").mkdir()
    (hosts / "db/recipe.toml").write_text('[[file]]\ndest = "{{ site.provision.config_dir }}/copy"\nbuild = "dnsmasq"\n'
                                          '[[file]]\ndest = "/etc/where.conf"\ntemplate = "where.j2"\n')
    (hosts / "db/where.j2").write_text("conf-file={{ site.provision.config_dir }}/dnsmasq/dnsmasq.conf\n")
    db = {f.dest: f for f in recipes(example, [example.vm("db")], hosts)["db"].files}
    assert "/etc/kvmconf/copy/dhcp-hosts/web" in db and "/etc/kvmconf/copy/dnsmasq.conf" in db
    assert db["/etc/where.conf"].content == b"conf-file=/etc/kvmconf/dnsmasq/dnsmasq.conf\n"


def test_template_errors_name_the_template_file_and_line_the_vm_and_the_recipe_key(example: Cluster,
                                                                                   tmp_path: Path) -> None:
    """They named no line, and paths relative to the recipes' parent with hosts/ for the template, so a copy of
    hosts/ in rec/ ($KVMCONF_RECIPES) showed rec/.../recipe.toml and hosts/.../motd.j2, neither of them real."""
    rec = Path(shutil.copytree(RECIPE_DIR, tmp_path / "rec"))
    motd, recipe = rec / "group/linux-servers/motd.j2", rec / "group/linux-servers/recipe.toml"
    named_at = f"{recipe}:6:1: key 'file.template'"
    cases = {
        "first\n{{ vm.nmae }}\n": f"{motd}:2: 'generators.model.Vm object' has no attribute 'nmae'",
        "first\n\n{% if vm.name %}\nno endif\n": f"{motd}:4: Unexpected end of template. Jinja was looking for the"
        " following tags: 'elif' or 'else' or 'endif'. The innermost block that needs to be closed is 'if'.",
        "{{ vm.name | no_filter }}\n": f"{motd}:1: No filter named 'no_filter'.",
        "first\n{{ vm.cpus // 0 }}\n": f"{motd}:2: ZeroDivisionError: integer division or modulo by zero",
    }
    for text, message in cases.items():
        motd.write_text(text)
        with pytest.raises(RecipeError) as err:
            recipes(example, example.vms, rec)
        # provision: the first VM of cluster.conf in linux-servers.
        assert str(err.value) == f"{message} (rendering it for VM provision; {named_at})", text
    # An error in a template that the recipe's includes is at its own line.
    (rec / "group/linux-servers/part.j2").write_text("first\nsecond {{ nope }}\n")
    motd.write_text("{% include 'group/linux-servers/part.j2' %}\n")
    with pytest.raises(RecipeError) as err:
        recipes(example, example.vms, rec)
    assert str(err.value) == (f"{rec}/group/linux-servers/part.j2:2: 'nope' is undefined (rendering {motd} for VM"
                              f" provision; {named_at})")
    motd.write_text("{% include 'part.j2' %}\n")
    with pytest.raises(RecipeError) as err:
        recipes(example, example.vms, rec)
    assert str(err.value) == (f"{motd}:1: 'part.j2' not found in search path: '{rec}' (rendering it for VM provision;"
                              f" {named_at})")
    motd.unlink()
    with pytest.raises(RecipeError) as err:
        recipes(example, example.vms, rec)
    assert str(err.value) == f"{named_at}: {motd} does not exist"


def test_a_hook_template_error_names_the_hook_its_line_and_the_hooks_key(example: Cluster, tmp_path: Path) -> None:
    hosts = _with_ldap_recipe(tmp_path, 'packages = ["slapd"]\nhooks = ["hooks/setup.sh"]\n')
    (hosts / "ldap/hooks").mkdir()
    (hosts / "ldap/hooks/setup.sh").write_text("#!/bin/sh\necho {{ vm.nmae }}\n")
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(err.value) == (f"{hosts}/ldap/hooks/setup.sh:2: 'generators.model.Vm object' has no attribute 'nmae'"
                              f" (rendering it for VM ldap; {hosts}/ldap/recipe.toml:2:1: key 'hooks')")


def test_the_repositorys_recipes_are_named_from_where_kvmconf_runs(example: Cluster, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Inside the current directory (the repository, where fab runs): hosts/..., as the admin would type it.
    hosts = _with_ldap_recipe(tmp_path, 'packages = "slapd"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(err.value) == "hosts/ldap/recipe.toml:1:1: key 'packages': 'slapd' is a string (expected a list of" \
                             " package names)"


def test_build_and_mode_errors_name_the_recipe(example: Cluster, tmp_path: Path) -> None:
    hosts = Path(shutil.copytree(RECIPE_DIR, tmp_path / "hosts"))
    (hosts / "mcp/recipe.toml").write_text('[[file]]\ndest = "/etc/x"\nbuild = "nagios/nope.cfg"\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, example.vms, hosts)
    assert str(err.value) == f"{hosts}/mcp/recipe.toml: file /etc/x: build/nagios/nope.cfg is not a generated file or" \
                             " directory"
    (hosts / "mcp/recipe.toml").write_text('[[file]]\ndest = "/etc/x"\ntemplate = "a"\nmode = "u+rwx"\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, example.vms, hosts)
    assert str(err.value) == (f"{hosts}/mcp/recipe.toml:4:1: key 'file.mode': 'u+rwx' is not an octal mode in quotes"
                              ' such as "0644" (expected 3 or 4 octal digits)')


def test_unknown_keys_are_refused_with_their_line_before_any_vm_is_reached(example: Cluster, tmp_path: Path) -> None:
    hosts = _with_ldap_recipe(tmp_path,
        'pakages = ["slapd"]\n\n[[file]]\ndest = "/etc/a"\ntemplate = "recipe.toml"\n\n'
        '[[file]]\ndest = "/etc/b"\ntemplate = "recipe.toml"\n  mod = "0600"\n')
    # A typo'd mode is never pushed: the run stops before any VM.
    err = _refused_before_any_vm(example, tmp_path, hosts)
    assert err == (
        f"{hosts}/ldap/recipe.toml:1:1: key 'pakages': unknown key (expected one of: packages, hooks, file)\n"
        f"{hosts}/ldap/recipe.toml:10:3: key 'file.mod': unknown key (expected one of: dest, template, build, owner,"
        " group, mode, reload)")
    # [file] instead of [[file]]: its keys would be taken for entries.
    (hosts / "ldap/recipe.toml").write_text('packages = ["slapd"]\n[file]\ndest = "/etc/a"\n')
    with pytest.raises(RecipeError) as refused:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(refused.value) == f"{hosts}/ldap/recipe.toml:2:1: key 'file': expected [[file]] tables"


def test_values_of_the_wrong_type_are_refused_with_their_line_before_any_vm_is_reached(example: Cluster,
                                                                                       tmp_path: Path) -> None:
    hosts = _with_ldap_recipe(tmp_path,
        'packages = "slapd"\nhooks = ["hooks/a.sh", 5]\n\n'
        '[[file]]\ndest = "/etc/a"\ntemplate = "recipe.toml"\nmode = 644\n\n'
        '[[file]]\ndest = "/etc/b"\nbuild = ["nagios"]\nmode = 600\nreload = "nagios4"\nowner = 0\n\n'
        '[[file]]\ntemplate = "recipe.toml"\ngroup = true\n')
    err = _refused_before_any_vm(example, tmp_path, hosts)
    where = f"{hosts}/ldap/recipe.toml"
    # The second table's mode is found on its own line 12, not on line 7 where the first table has a mode.
    assert err.splitlines() == [
        f"{where}:1:1: key 'packages': 'slapd' is a string (expected a list of package names)",
        f"{where}:2:1: key 'hooks': ['hooks/a.sh', 5] is not a list of hook scripts such as \"hooks/x.sh\" (expected"
        ' strings in quotes, such as ["a", "b"])',
        f"{where}:7:1: key 'file.mode': 644 is an integer (expected an octal mode in quotes such as \"0644\")",
        f"{where}:11:1: key 'file.build': ['nagios'] is a list (expected a generated file or directory of build/)",
        f"{where}:12:1: key 'file.mode': 600 is an integer (expected an octal mode in quotes such as \"0644\")",
        f"{where}:13:1: key 'file.reload': 'nagios4' is a string (expected a list of service names)",
        f"{where}:14:1: key 'file.owner': 0 is an integer (expected a user name)",
        f"{where}:16:1: key 'file.dest' is missing (expected an absolute path on the VM)",
        f"{where}:18:1: key 'file.group': True is a boolean (expected a group name)",
    ]


def test_paths_outside_the_recipe_directory_or_build_are_refused_with_their_line(example: Cluster,
                                                                                  tmp_path: Path) -> None:
    """An absolute template path crashed with Python's `ValueError: ... is not in the subpath`; build = "." took
    the whole of build/, and a hook of ../ ran a script of another recipe (or none at all)."""
    hosts = _with_ldap_recipe(tmp_path,
        'hooks = ["hooks/ok.sh", "../mcp/hooks/nagios-localhost.sh"]\n\n'
        '[[file]]\ndest = "/etc/a"\ntemplate = "/etc/hostname"\n\n'
        '[[file]]\ndest = "/etc/b"\n  template = "sub/../../mcp/recipe.toml"\n\n'
        '[[file]]\ndest = "/etc/c"\nbuild = "/etc"\n\n'
        '[[file]]\ndest = "/etc/d"\nbuild = "."\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    where = f"{hosts}/ldap/recipe.toml"
    assert str(err.value).splitlines() == [
        f"{where}:1:1: key 'hooks': ['hooks/ok.sh', '../mcp/hooks/nagios-localhost.sh'] is not a list of hook scripts"
        " such as \"hooks/x.sh\" ('../mcp/hooks/nagios-localhost.sh': expected a relative path below the recipe's"
        " directory, without ..)",
        f"{where}:5:1: key 'file.template': '/etc/hostname' is not a template file next to the recipe (expected a"
        " relative path below the recipe's directory, without ..)",
        f"{where}:9:3: key 'file.template': 'sub/../../mcp/recipe.toml' is not a template file next to the recipe"
        " (expected a relative path below the recipe's directory, without ..)",
        f"{where}:13:1: key 'file.build': '/etc' is not a generated file or directory of build/ (expected a relative"
        " path below build/, without ..)",
        f"{where}:17:1: key 'file.build': '.' is not a generated file or directory of build/ (expected a relative path"
        " below build/, without ..)",
    ]


def test_values_of_the_wrong_form_are_refused_all_at_once_with_their_line(example: Cluster, tmp_path: Path) -> None:
    """They were refused one at a time, without a line, and only as each VM's recipe was assembled."""
    hosts = _with_ldap_recipe(tmp_path,
        'packages = ["slapd", "-x"]\n\n'
        '[[file]]\ndest = "/etc/../shadow"\ntemplate = "recipe.toml"\nowner = "a b"\ngroup = ""\n\n'
        '[[file]]\ndest = "etc/b"\ntemplate = "recipe.toml"\nbuild = "ssh/config"\nreload = ["nagios4", "x;y"]\n')
    err = _refused_before_any_vm(example, tmp_path, hosts)
    where = f"{hosts}/ldap/recipe.toml"
    name_rule = "(expected letters, digits and . _ @ + : -, starting with a letter or digit)"
    path_rule = "(expected / then letters, digits and . _ @ + / -, without ..)"
    assert err.splitlines() == [
        f"{where}:1:1: key 'packages': ['slapd', '-x'] is not a list of package names ('-x': expected letters, digits"
        " and . _ @ + : -, starting with a letter or digit)",
        f"{where}:4:1: key 'file.dest': '/etc/../shadow' is not an absolute path on the VM {path_rule}",
        f"{where}:6:1: key 'file.owner': 'a b' is not a user name {name_rule}",
        f"{where}:7:1: key 'file.group': '' is not a group name {name_rule}",
        f"{where}:9:1: [[file]] table: give exactly one of template = ... or build = ...",
        f"{where}:10:1: key 'file.dest': 'etc/b' is not an absolute path on the VM {path_rule}",
        f"{where}:13:1: key 'file.reload': ['nagios4', 'x;y'] is not a list of service names ('x;y': expected"
        " letters, digits and . _ @ + : -, starting with a letter or digit)",
    ]


def test_an_owner_or_group_given_as_a_number_is_refused_with_its_line(example: Cluster, tmp_path: Path) -> None:
    """chown took owner = "0", but the VM's files are compared by name ("root:root:644 ..."): the file differed on
    every update-confs, was pushed again and its services reloaded, week after week."""
    hosts = _with_ldap_recipe(tmp_path, '[[file]]\ndest = "/etc/a"\ntemplate = "recipe.toml"\nowner = "0"\n'
                                        'group = "998"\nreload = ["slapd"]\n')
    err = _refused_before_any_vm(example, tmp_path, hosts)
    why = ("(a number, which chown takes for an id while the VM's files are compared by name: the file would be"
           ' pushed again on every run; give the name, such as "root")')
    assert err.splitlines() == [f"{hosts}/ldap/recipe.toml:4:1: key 'file.owner': '0' is not a user name {why}",
                                f"{hosts}/ldap/recipe.toml:5:1: key 'file.group': '998' is not a group name {why}"]
    # A name with digits is a name.
    (hosts / "ldap/recipe.toml").write_text('[[file]]\ndest = "/etc/a"\ntemplate = "recipe.toml"\nowner = "u1000"\n')
    assert recipes(example, [example.vm("ldap")], hosts)["ldap"].files[-1].owner == "u1000"


def test_a_dest_with_jinja_is_checked_once_rendered_with_its_line(example: Cluster, tmp_path: Path) -> None:
    hosts = _with_ldap_recipe(tmp_path, '[[file]]\n\ndest = "/etc/{{ vm.hostgroups | join(\' \') }}"\n'
                                            'template = "recipe.toml"\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(err.value) == (f"{hosts}/ldap/recipe.toml:3:1: key 'file.dest':"
                              " \"/etc/{{ vm.hostgroups | join(' ') }}\""
                              " renders as '/etc/linux-servers infrastructure' for ldap, which is not an absolute"
                              " path on the VM (expected / then letters, digits and . _ @ + / -, without ..)")
    (hosts / "ldap/recipe.toml").write_text('[[file]]\ndest = "/etc/{{ vm.nmae }}"\ntemplate = "recipe.toml"\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(err.value) == (f"{hosts}/ldap/recipe.toml:2:1: key 'file.dest': '/etc/{{{{ vm.nmae }}}}':"
                              " 'generators.model.Vm object' has no attribute 'nmae' (rendering it for VM ldap)")


def test_a_string_for_a_list_is_not_taken_letter_by_letter(example: Cluster, tmp_path: Path) -> None:
    """Before the type check, packages = "slapd" installed packages s, l, a, p and d."""
    hosts = _with_ldap_recipe(tmp_path, 'packages = "slapd"\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(err.value) == (f"{hosts}/ldap/recipe.toml:1:1: key 'packages': 'slapd' is a string (expected a list of"
                              " package names)")
    (hosts / "ldap/recipe.toml").write_text('packages = ["slapd"]\n')
    assert recipes(example, [example.vm("ldap")], hosts)["ldap"].packages == ("openssh-server", "slapd")


def test_inline_file_tables_are_checked_too(example: Cluster, tmp_path: Path) -> None:
    # No [[file]] header to find the keys under: the problems point at the `file` key, not at the start of the file.
    hosts = _with_ldap_recipe(tmp_path, 'packages = ["slapd"]\n\nfile = [{dest = "/etc/a",'
                                            ' template = "recipe.toml", mode = 644},\n  {template = "recipe.toml"}]\n')
    with pytest.raises(RecipeError) as err:
        recipes(example, [example.vm("ldap")], hosts)
    assert str(err.value).splitlines() == [
        f"{hosts}/ldap/recipe.toml:3:1: key 'file.dest' is missing (expected an absolute path on the VM)",
        f"{hosts}/ldap/recipe.toml:3:1: key 'file.mode': 644 is an integer (expected an octal mode in quotes such as"
        ' "0644")']


def test_waves_for_a_subset(example: Cluster) -> None:
    chosen = [vm for vm in example.vms if vm.name in ("db", "web", "login")]
    # ldap is not chosen, so db and login may start at once; web still waits for db.
    assert [[vm.name for vm in wave] for wave in waves(chosen)] == [["db", "login"], ["web"]]


def test_remote_words_are_quoted() -> None:
    name = "x'; rm -rf / #"
    assert shlex.split(command("mkdir", "-p", "--", name)) == ["mkdir", "-p", "--", name]
    out = subprocess.run(script('printf "%s|" "$@"', name, "$(id)"), shell=True, capture_output=True, text=True,
                         check=True).stdout
    assert out == f"{name}|$(id)|"


def test_targets_come_from_the_generated_ssh_config(example: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(str(ssh_config.render(example)[PurePosixPath("ssh/config")]))
    target = resolve("db", config)
    assert (target.hostname, target.port, target.user) == ("192.168.50.20", 22, "root")
    assert target.known_hosts == os.path.expanduser("~/.ssh/kvmconf_known_hosts")


def _with_ldap_recipe(tmp_path: Path, text: str) -> Path:
    """A copy of hosts/ whose ldap recipe.toml is ``text``."""
    hosts = Path(shutil.copytree(RECIPE_DIR, tmp_path / "hosts"))
    (hosts / "ldap/recipe.toml").write_text(text)
    return hosts


def _refused_before_any_vm(example: Cluster, tmp_path: Path, hosts: Path) -> str:
    """The error of a deploy with no ssh config at all: a recipe problem must stop it before it looks for a VM,
    so nothing is installed or pushed."""
    with pytest.raises(RecipeError) as err:
        run_cluster(example, [], True, Options(tmp_path / "no-ssh-config", recipe_dir=hosts))
    return str(err.value)


def test_a_recipe_that_applies_to_no_vm_gets_a_note_naming_it(example: Cluster, tmp_path: Path) -> None:
    """A misspelt directory was skipped without a word, and its VM deployed without its recipe."""
    hosts = Path(shutil.copytree(RECIPE_DIR, tmp_path / "hosts"))
    assert unused_recipes(example, hosts) == []  # every recipe of the example applies to a VM
    (hosts / "ldap").rename(hosts / "ladp")
    (hosts / "group/linux-servers").rename(hosts / "group/linux-server")
    (hosts / "notes").mkdir()  # a directory without a recipe.toml is not a recipe
    assert unused_recipes(example, hosts) == [
        f"{hosts}/ladp/recipe.toml: note: no VM of cluster.conf is named ladp: this recipe is not deployed",
        f"{hosts}/group/linux-server/recipe.toml: note: no VM of cluster.conf is in hostgroup linux-server: this"
        " recipe is not deployed"]
