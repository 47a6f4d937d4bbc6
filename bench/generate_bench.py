#!/usr/bin/env python3
"""Time `python -m generators` on a synthetic cluster of 10,000 VMs on 50 physical hosts.

Targets (2-core machine): full build <= 10 s and <= 500 MB peak memory; a no-op rebuild <= 2 s
writing 0 files; changing one VM rewrites only that VM's files and the shared files naming it.
Run: .venv/bin/python bench/generate_bench.py [--vms N] [--hosts N]

Leave a few minutes between runs. When ext4 allocates an inode it skips those deleted in the last one to
five minutes, and after 44,000 deletions that search costs the kernel seconds: a full build right after
an earlier run's output was deleted took 13-28 s here instead of 8-9 s. So the previous output is moved
aside first and deleted only after the timed runs.
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
OUT = ROOT / "bench" / "out" / "generate"


def site_toml(hosts: int) -> str:
    lines = [
        'domain = "bench.example.org"', 'default_network = "lan"', 'default_os = "bookworm"',
        "[accounts]", 'admin_user = "admin"',
        'ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFvq3ekr8hCxWn5tLCX6TfvWO5w8VFtOr3kRxK9Vp3m bench"]',
        "[networks.lan]", 'subnet = "10.20.0.0/16"', 'gateway = "10.20.0.1"', 'bridge = "br0"',
        'dns = ["10.20.0.2"]', 'dhcp_ranges = ["10.20.255.1-10.20.255.250"]',
        "[os.bookworm]", 'family = "debian"', 'suite = "bookworm"', 'kernel = "debian-installer/amd64/linux"',
        'initrd = "debian-installer/amd64/initrd.gz"', 'cloud_image = "/var/lib/libvirt/images/base/debian-12.qcow2"',
        "[backup]", 'schedule = "30 2 * * *"',
        "[provision]", 'server = "10.20.0.2"', 'http_url = "http://10.20.0.2"', 'interface = "br0"',
    ]
    for n in range(hosts):
        # An address for the Nagios backup check of its VMs, outside the VMs' subnet so that it collides with none.
        lines += [f"[hosts.kvm{n:02d}]", 'uri = "qemu:///system"', f'address = "10.21.{n // 250}.{n % 250 + 1}"',
                  "ram_mb = 1048576", "cpus = 128",
                  "cpu_overcommit = 4.0", "disk_gb = 40000"]
    return "\n".join(lines) + "\n"


def cluster_conf(vms: int, hosts: int) -> str:
    installs = ["install=pxe", "install=pxe boot=uefi", "install=cloud", "install=pxe", "install=none"]
    groups = [f"group{g}" for g in range(20)]
    rows = ["#name\tmac\tip\tram\tdisk\tcpus\thostgroups\toptions"]
    for i in range(vms):
        ip = f"10.20.{(i + 10) // 250}.{(i + 10) % 250 + 3}"
        mac = f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        options = f"host=kvm{i % hosts:02d} {installs[i % len(installs)]}"
        rows.append(f"vm{i:05d}\t{mac}\t{ip}\t2048\t20\t2\t{groups[i % 20]},{groups[(i * 7 + 3) % 20]}\t{options}")
    return "\n".join(rows) + "\n"


def run(label: str, build: Path, cluster: Path, site: Path) -> tuple[float, float, str]:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "generators", "--cluster", str(cluster), "--site", str(site),
                                "--build", str(build), "--verbose"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{label}: generators failed with status {status}")
    peak_mb = usage.ru_maxrss / 1024
    summary = output.strip().splitlines()[-1]
    print(f"{label:<28} {elapsed:7.2f} s  {peak_mb:7.1f} MB peak   {summary.split('; ', 1)[-1]}")
    return elapsed, peak_mb, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--hosts", type=int, default=50)
    args = parser.parse_args()
    previous = OUT.with_name(f"{OUT.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if OUT.exists():
        OUT.rename(previous)  # deleted after the timed runs (see above)
    OUT.mkdir(parents=True)
    cluster, site, build = OUT / "cluster.conf", OUT / "site.toml", OUT / "build"
    site.write_text(site_toml(args.hosts))
    cluster.write_text(cluster_conf(args.vms, args.hosts))
    print(f"synthetic cluster: {args.vms} VMs on {args.hosts} hosts ({os.cpu_count()} CPUs)")
    os.sync()  # the inputs just written: no write-back of them inside the timed build
    full, peak, _ = run("full build", build, cluster, site)
    files = sum(1 for p in build.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in build.rglob("*") if p.is_file()) / 2**20
    print(f"{'':<28} {files} files, {size:.0f} MiB")
    noop, _, output = run("no-op rebuild", build, cluster, site)
    assert "wrote " not in output, "a no-op rebuild wrote files"
    # Change one VM's IP: its own files and the shared files that name it must be the only writes.
    lines = cluster.read_text().splitlines()
    lines[1] = lines[1].replace("\t10.20.0.13\t", "\t10.20.200.13\t")
    cluster.write_text("\n".join(lines) + "\n")
    _, _, output = run("one VM's IP changed", build, cluster, site)
    written = sorted(line.split(f"{build}/", 1)[1] for line in output.splitlines() if line.startswith("wrote "))
    print(f"{'':<28} rewrote {len(written)} files: {', '.join(written)}")
    shutil.rmtree(previous, ignore_errors=True)
    verdict = "MET" if full <= 10 and peak <= 500 and noop <= 2 else "NOT MET"
    print(f"targets (full <= 10 s, <= 500 MB, no-op <= 2 s): {verdict}")


if __name__ == "__main__":
    main()
