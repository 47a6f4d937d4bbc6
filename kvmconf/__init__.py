"""kvmconf's side-effecting half: libvirt domains, disks, provisioning, status and the local lab.

``generators/`` is pure (cluster.conf + site.toml -> build/); everything here talks to libvirt,
runs qemu-img/LVM on the physical hosts, or starts processes. ``tasks.py`` is a thin layer over it.
"""
