#!/usr/bin/env python3
"""Time `fab update-confs` against `ansible-playbook` copying the same 20 files to the same 20 hosts.

The hosts are real sshds on 127.0.0.x, each chrooted into its own overlay root (tests/sshfarm.py), so
nothing lands in this machine's /etc. Both tools push 20 files (owner, mode, backup of a replaced file)
to every host, all hosts at once (--parallel 20 / forks=20), each into its own directory; then both run
again with nothing to change (the no-op run). ansible-core comes from PyPI into bench/out/deploy/ansible-venv,
never into the project's venv.

Target: kvmconf at least as fast as Ansible on both runs. Run as root: .venv/bin/python bench/deploy_bench.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvmconf.keyscan import keyscan  # noqa: E402
from tests import sshfarm  # noqa: E402

OUT = ROOT / "bench" / "out" / "deploy"
ANSIBLE_VENV = OUT / "ansible-venv"
MAC_PREFIX = "52:54:00:77"


def ansible_playbook() -> Path:
    exe = ANSIBLE_VENV / "bin" / "ansible-playbook"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_VENV)], check=True)
        subprocess.run([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", "ansible-core"], check=True)
    return exe


def write_inputs(hosts: int, files: int) -> list[str]:
    names = [f"bench{i:02d}" for i in range(hosts)]
    lines = ["#name\tmac\tip\tram\tdisk\tcpus\thostgroups\toptions"]
    lines += [f"{n}\t{MAC_PREFIX}:00:{i + 10:02x}\t192.168.50.{i + 10}\t512\t5\t1\tbench\thost=kvm0"
              for i, n in enumerate(names)]
    (OUT / "cluster.conf").write_text("\n".join(lines) + "\n")
    # The example site.toml, with the bench's hostgroup and without a provision VM (there is none here).
    site = (ROOT / "site.toml").read_text().replace('vm = "provision"', 'server = "192.168.50.2"')
    (OUT / "site.toml").write_text(site + 'bench = "Bench hosts"\n')
    recipes = OUT / "hosts" / "group" / "bench"
    shutil.rmtree(OUT / "hosts", ignore_errors=True)
    (OUT / "files").mkdir(exist_ok=True)
    recipes.mkdir(parents=True)
    entries = []
    for index in range(files):
        # ~4 KB each: a config file of ordinary size.
        content = "".join(f"setting_{index}_{line} = value {line * index}\n" for line in range(150))
        (recipes / f"file{index:02d}.conf").write_text(content)
        (OUT / "files" / f"file{index:02d}.conf").write_text(content)
        entries.append(f'[[file]]\ndest = "/etc/bench-kvmconf/file{index:02d}.conf"\n'
                       f'template = "file{index:02d}.conf"\nmode = "0640"\n')
    (recipes / "recipe.toml").write_text("\n".join(entries))
    return names


def write_playbook(farm: sshfarm.Farm, names: list[str], files: int) -> Path:
    inventory = OUT / "inventory.ini"
    inventory.write_text("[bench]\n" + "".join(f"{n}\n" for n in names) + "\n[bench:vars]\nansible_user=root\n"
                         f"ansible_ssh_common_args=-F {farm.ssh_config}\n"
                         "ansible_python_interpreter=/usr/bin/python3\n")
    tasks = "".join(f"""    - name: file{i:02d}
      ansible.builtin.copy:
        src: {OUT / 'files' / f'file{i:02d}.conf'}
        dest: /etc/bench-ansible/file{i:02d}.conf
        owner: root
        group: root
        mode: "0640"
        backup: true
""" for i in range(files))
    playbook = OUT / "playbook.yml"
    playbook.write_text(f"""- hosts: bench
  gather_facts: false
  tasks:
    - name: directory
      ansible.builtin.file:
        path: /etc/bench-ansible
        state: directory
{tasks}""")
    (OUT / "ansible.cfg").write_text("[defaults]\nforks = 20\nhost_key_checking = True\n"
                                     "[ssh_connection]\npipelining = True\n")
    return playbook


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False, cwd=OUT)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--files", type=int, default=20)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    playbook_exe = ansible_playbook()
    names = write_inputs(args.hosts, args.files)
    farm = sshfarm.start(names, tag="-bench")
    try:
        keyscan(names, farm.ssh_config)
        playbook = write_playbook(farm, names, args.files)
        env = {**os.environ, "KVMCONF_CLUSTER": str(OUT / "cluster.conf"), "KVMCONF_SITE": str(OUT / "site.toml"),
               "KVMCONF_SSH_CONFIG": str(farm.ssh_config), "KVMCONF_RECIPES": str(OUT / "hosts"),
               "ANSIBLE_CONFIG": str(OUT / "ansible.cfg")}
        fab = [str(ROOT / ".venv" / "bin" / "fab"), "-r", str(ROOT), "update-confs", "--parallel", "20"]
        ansible = [str(playbook_exe), "-i", str(OUT / "inventory.ini"), str(playbook)]
        results = {}
        for label, cmd in (("kvmconf", fab), ("ansible", ansible)):
            first, out_first = timed(cmd, env)
            noop, out_noop = timed(cmd, env)
            results[label] = (first, noop, out_first, out_noop)
        # Both really did the work, and the second runs changed nothing. Each VM's line is printed once, as that
        # VM is done, and the summary (the last line) only counts VMs and failures (RunReport.summary).
        k_first, k_noop = results["kvmconf"][2:]
        for out, changed in ((k_first, args.files), (k_noop, 0)):
            assert out.count(f"({changed} file(s) changed)") == args.hosts, out[-3000:]
            assert out.rstrip("\n").rpartition("\n")[2] == f"update-confs: {args.hosts} VM(s), 0 failed", out[-3000:]
        assert results["ansible"][2].count(f"changed={args.files + 1} ") == args.hosts, results["ansible"][2][-2000:]
        assert results["ansible"][3].count("changed=0 ") == args.hosts, results["ansible"][3][-2000:]
        for name in names:
            for index in range(args.files):
                mine = farm.root(name) / f"etc/bench-kvmconf/file{index:02d}.conf"
                theirs = farm.root(name) / f"etc/bench-ansible/file{index:02d}.conf"
                assert mine.read_bytes() == theirs.read_bytes()
    finally:
        sshfarm.teardown(farm.base)
    print(f"update of {args.files} files on {args.hosts} loopback hosts (seconds, wall clock):")
    print(f"{'':10}{'first run':>12}{'no-op run':>12}")
    for label, (first, noop, _, _) in results.items():
        print(f"{label:10}{first:12.2f}{noop:12.2f}")
    k, a = results["kvmconf"], results["ansible"]
    ok = k[0] <= a[0] and k[1] <= a[1]
    print(f"target (kvmconf at least as fast on both runs): {'met' if ok else 'NOT met'}"
          f" ({a[0] / k[0]:.1f}x and {a[1] / k[1]:.1f}x faster)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
