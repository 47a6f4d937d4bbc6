#!/usr/bin/env python3
"""Time provisioning 10 VMs in the lab: kvmconf vs `virt-install --import`, and overlay creation vs base size.

Both tools do the same for each VM on the same lab daemon (libvirtd + QEMU under software
emulation, in a network namespace): a thin qcow2 overlay on one cloud base image, the NoCloud
seed ISO attached, 128 MB of RAM, a NIC on the lab bridge, define, autostart, start.
kvmconf runs once (`invoke provision --all`, one process); virt-install runs once per VM, as a
script around it would. Then disks.create makes overlays on a 1 GB and a 20 GB base (both fully
allocated with fallocate): an overlay only records its base's path, so the time must not grow.

Targets: kvmconf no slower than virt-install; overlay creation O(1) in the base's size.
Run as root: .venv/bin/python bench/provision_bench.py [--vms N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from generators.validate import load_cluster  # noqa: E402
from kvmconf import disks, domains, lab  # noqa: E402
from kvmconf.disks import DiskSpec  # noqa: E402
from kvmconf.runner import Runner  # noqa: E402

OUT = ROOT / "bench" / "out" / "provision"
RAM_MB, DISK_GB = 128, 2


def site_toml() -> str:
    lines = [
        'domain = "bench.example.org"', 'default_network = "lan"', 'default_os = "bookworm"',
        "[accounts]", 'admin_user = "admin"',
        'ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFvq3ekr8hCxWn5tLCX6TfvWO5w8VFtOr3kRxK9Vp3m bench"]',
        "[networks.lan]", 'subnet = "192.168.50.0/24"', 'gateway = "192.168.50.1"', 'bridge = "br0"',
        "[hosts.kvm0]", 'uri = "qemu:///system"', "ram_mb = 65536", "cpus = 64", "disk_gb = 1000",
        'address = "192.168.50.4"',  # for the Nagios backup check of its VMs (10 and up)
        "[os.bookworm]", 'family = "debian"', 'suite = "bookworm"', 'kernel = "debian-installer/amd64/linux"',
        'initrd = "debian-installer/amd64/initrd.gz"', 'cloud_image = "/var/lib/libvirt/images/base/debian-12.qcow2"',
        "[provision]", 'server = "192.168.50.2"', 'http_url = "http://192.168.50.2"', 'interface = "br0"',
        "[backup]", 'dir = "/var/backups/kvmconf"',
    ]
    return "\n".join(lines) + "\n"


def cluster_conf(vms: int) -> str:
    rows = ["#name\tmac\tip\tram\tdisk\tcpus\thostgroups\toptions"]
    rows += [f"bench{i:02d}\t52:54:00:ee:00:{i:02x}\t192.168.50.{10 + i}\t{RAM_MB}\t{DISK_GB}\t1\t-"
             "\thost=kvm0 install=cloud" for i in range(vms)]
    return "\n".join(rows) + "\n"


def running(uri: str) -> list[str]:
    conn = libvirt.open(uri)
    try:
        return sorted(dom.name() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    finally:
        conn.close()


def empty(the_lab: lab.Lab) -> None:
    conn = libvirt.open(the_lab.uri)
    try:
        for dom in conn.listAllDomains():
            domains.power_off(dom)
            domains.undefine(dom, keep_nvram=False)
        for pool in conn.listAllStoragePools():  # virt-install made one for the images directory
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    finally:
        conn.close()
    for path in (the_lab.images / "kvm0").iterdir():
        if not path.name.endswith("-seed.iso"):
            path.unlink()


def time_kvmconf(the_lab: lab.Lab, cluster: Path, site: Path, vms: int) -> float:
    env = {**os.environ, "KVMCONF_CLUSTER": str(cluster), "KVMCONF_SITE": str(site), "KVMCONF_LAB": str(the_lab.dir)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "invoke", "provision", "--all"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    assert len(running(the_lab.uri)) == vms, "kvmconf did not start every VM"
    return elapsed


def time_virt_install(the_lab: lab.Lab, vms: int) -> float:
    images = the_lab.images / "kvm0"
    base = the_lab.base / "bookworm.qcow2"
    start = time.perf_counter()
    for i in range(vms):
        name = f"vi{i:02d}"
        # The seed ISO kvmconf wrote for bench<i>: the same file content, attached the same way. The
        # generic OS (no libosinfo lookup, no --osinfo warning) is the quickest virt-install can be.
        result = subprocess.run([
            "virt-install", "--connect", the_lab.uri, "--name", name, "--memory", str(RAM_MB), "--vcpus", "1",
            "--virt-type", "qemu", "--machine", "q35", "--import", "--osinfo", "generic",
            "--disk", f"path={images / name}.qcow2,format=qcow2,size={DISK_GB},backing_store={base},"
                      "backing_format=qcow2,bus=virtio",
            "--disk", f"path={images / f'bench{i:02d}-seed.iso'},device=cdrom,bus=sata",
            "--network", f"bridge=br0,mac=52:54:00:ef:00:{i:02x},model=virtio",
            "--graphics", "none", "--autostart", "--noautoconsole",
        ], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"virt-install failed for {name}: {result.stderr}")
    elapsed = time.perf_counter() - start
    assert len(running(the_lab.uri)) == vms, "virt-install did not start every VM"
    return elapsed


def overlay_seconds(base: Path, size_gb: int, runs: int = 7) -> float:
    runner = Runner()
    times = []
    for i in range(runs):
        disk = DiskSpec(f"o{i}", str(base.parent / f"overlay-{size_gb}-{i}.qcow2"), disks.DiskKind.QCOW2, size_gb,
                        backing=str(base))
        start = time.perf_counter()
        disks.create(runner, disk)
        times.append(time.perf_counter() - start)
        Path(disk.path).unlink()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("virt-install") is None:
        sys.exit("virt-install is not installed (Debian package virtinst)")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    cluster, site = OUT / "cluster.conf", OUT / "site.toml"
    cluster.write_text(cluster_conf(args.vms))
    site.write_text(site_toml())
    print(f"{args.vms} VMs: qcow2 overlay ({DISK_GB} GB) on one base, seed ISO, {RAM_MB} MB RAM, software emulation,"
          f" one lab daemon ({os.cpu_count()} CPUs)")
    lab.remove_stale_netns("kvmconf-bench-")
    the_lab = lab.up(load_cluster(cluster, site), OUT / "lab", f"kvmconf-bench-{os.getpid()}", log=lambda _: None)
    try:
        ours = time_kvmconf(the_lab, cluster, site, args.vms)
        empty(the_lab)
        theirs = time_virt_install(the_lab, args.vms)
        empty(the_lab)
    finally:
        lab.teardown(the_lab, log=lambda _: None)
    print(f"  kvmconf: invoke provision --all (one run)   {ours:6.2f} s  ({ours / args.vms:.2f} s per VM)")
    print(f"  virt-install --import (one run per VM)     {theirs:6.2f} s  ({theirs / args.vms:.2f} s per VM)")
    print(f"  target (kvmconf no slower): {'MET' if ours <= theirs else 'NOT MET'} ({theirs / ours:.1f}x)")

    print("overlay creation (disks.create: qemu-img info + create + link), median of 7:")
    results = {}
    for size in (1, 20):
        base = OUT / f"base-{size}g.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", str(base), f"{size}G"],
                       check=True)
        allocated = int(subprocess.run(["du", "-B1", str(base)], capture_output=True, text=True,
                                       check=True).stdout.split()[0])
        results[size] = overlay_seconds(base, size)
        print(f"  on a {size:2d} GB base ({allocated / 2**30:4.1f} GB allocated)   {results[size] * 1000:6.1f} ms")
        base.unlink()
    ratio = results[20] / results[1]
    print(f"  target (O(1) in the base's size): {'MET' if ratio < 1.5 else 'NOT MET'} (20 GB / 1 GB = {ratio:.2f})")


if __name__ == "__main__":
    main()
