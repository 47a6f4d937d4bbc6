"""Start the lab's daemons under a process that adopts and reaps their orphans at once.

Run by ``kvmconf.lab`` as ``ip netns exec <ns> python reaper.py <lab dir> <script>``. libvirtd and
virtlogd daemonize, and QEMU is daemonized by libvirtd, so all of them end up orphans; orphans
go to PID 1, and where PID 1 is slow to reap (containers, CI sandboxes) a killed QEMU stays a
zombie that libvirt takes for alive, which made every ``virsh destroy`` take seconds. As a child
subreaper (prctl PR_SET_CHILD_SUBREAPER) this process receives those orphans instead and reaps
them at once. It stays in the background until the last of them has exited.

The foreground process exits with the launch script's exit status once the daemons are up.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(lab_dir: str, script: str) -> int:
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        reported = os.read(read_end, 16)
        return int(reported) if reported.strip().isdigit() else 1
    os.close(read_end)
    os.setsid()
    with open(os.path.join(lab_dir, "reaper.pid"), "w") as pid_file:
        pid_file.write(f"{os.getpid()}\n")
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(write_end, b"1")
        return 1
    # Nobody reads our output once the foreground process is gone: keep it in the lab directory.
    log = os.open(os.path.join(lab_dir, "launch.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    status = subprocess.call(["sh", "-c", script, "sh", lab_dir])
    os.write(write_end, str(status).encode())
    os.close(write_end)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0  # every daemon and QEMU of the lab has exited
        except InterruptedError:
            continue


if __name__ == "__main__":
    os._exit(main(sys.argv[1], sys.argv[2]))
