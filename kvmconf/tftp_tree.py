"""The TFTP root the provision server serves: boot loaders, installers and per-MAC boot entries, and install marks.

A VM's install is marked done (kvmconf.install_http, ``<http_url>/installed/<vm>``) by removing its per-MAC
boot entries from the TFTP root, so its next PXE boot reads the defaults (pxelinux: LOCALBOOT; GRUB: exit to
the next boot device, the disk). ``invoke reinstall --vm`` puts them back. Because every deploy assembles the
TFTP root from build/ *and* the installed state, a later `make` + deploy never turns an installed VM back
into one that reinstalls; and per-MAC entries the build no longer has (a VM removed, a MAC changed) are
deleted. The marks of VMs gone from the build go at the end of a deploy that succeeded: a VM created later
under such a name is installed. Every file copied from this machine's packages is checked for before the first
change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from generators import pxe
from generators.model import Cluster
from generators.pxe import BIOS_LOADER_FILES
from kvmconf.errors import KvmconfError
from kvmconf.processes import output_of
from kvmconf.provision_state import boot_entries, build_dir_in, read_installed, state_locked, write_installed

# The Debian netboot package per suite: debian-installer-<N>-netboot-amd64 puts its tree here.
NETBOOT_RELEASES = {"bullseye": 11, "bookworm": 12, "trixie": 13}
NETBOOT_DIR = "/usr/lib/debian-installer/images/{release}/amd64/text"
GRUB_EFI_MODULES = Path("/usr/lib/grub") / pxe.GRUB_PLATFORM


def netboot_dir(suite: str) -> Path:
    release = NETBOOT_RELEASES.get(suite)
    if release is None:
        raise KvmconfError(f"no Debian netboot images known for suite {suite!r} (known: {', '.join(NETBOOT_RELEASES)})")
    path = Path(NETBOOT_DIR.format(release=release))
    if not path.is_dir():
        raise KvmconfError(f"{path} is missing: install the package debian-installer-{release}-netboot-amd64")
    return path


def tftp_sources(cluster: Cluster, tftp_root: Path) -> dict[str, Path]:
    """The files the TFTP root needs from this machine's packages (its path there -> the file): pxelinux and each
    OS's installer kernel and initrd. Every one missing, and GRUB's EFI modules when the root has no GRUB image
    yet, is one KvmconfError before anything is written: a deploy never stops halfway for a package."""
    sources = {name: Path(src) for name, src in BIOS_LOADER_FILES.items()}
    problems: list[str] = []
    for release in cluster.site.oses.values():
        if release.family != "debian" or not release.kernel or not release.initrd:
            continue
        try:
            netboot = netboot_dir(release.suite)
        except KvmconfError as missing:
            problems.append(str(missing))
            continue
        sources.update({rel.lstrip("/"): netboot / rel.lstrip("/") for rel in (release.kernel, release.initrd)})
    problems += [f"{src} is missing (needed in the TFTP root as {Path(rel).name})" for rel, src in sources.items()
                 if not src.is_file()]
    if not (tftp_root / pxe.GRUB_CORE_EFI).exists():
        if not GRUB_EFI_MODULES.is_dir():
            problems.append(f"{GRUB_EFI_MODULES} is missing: install the package grub-efi-amd64-bin")
        if shutil.which("grub-mknetdir") is None:
            problems.append("grub-mknetdir is missing: install the package grub-common")
    if problems:
        raise KvmconfError("the TFTP root cannot be assembled; nothing was changed: " + "; ".join(problems))
    return sources


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise KvmconfError(f"{src} is missing (needed in the TFTP root as {dst.name})")
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary: a deploy and an install mark (or two deploys) may copy the same file at once.
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".new", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)  # with src's mtime, which the next deploy compares
        os.chmod(tmp, 0o644)  # TFTP serves world-readable files only
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def assemble_tftp(cluster: Cluster, build: Path, tftp_root: Path) -> None:
    """The TFTP root: the generated boot configs (none for installed VMs), pxelinux, a GRUB EFI image with
    prefix /grub, each OS's installer kernel and initrd."""
    sources = tftp_sources(cluster, tftp_root)  # before the first change
    copy_boot_entries(build, tftp_root)
    if not (tftp_root / pxe.GRUB_CORE_EFI).exists():
        # Debian's netboot grubx64.efi has /debian-installer/amd64/grub built in as its prefix: it would never
        # read grub/grub.cfg. grub-mknetdir makes an image whose prefix is the TFTP directory grub/.
        output_of(["grub-mknetdir", f"-d{GRUB_EFI_MODULES}", f"--net-directory={tftp_root}",
                   f"--subdir={pxe.GRUB_DIR}"])
    _copy_if_changed(tftp_root / pxe.GRUB_CORE_EFI, tftp_root / pxe.GRUB_EFI_IMAGE)
    for rel, src in sources.items():
        _copy_if_changed(src, tftp_root / rel)


def copy_boot_entries(build: Path, tftp_root: Path) -> None:
    """The TFTP root's boot configs made those of build/: a deploy's, or the previous build's put back.

    Every file of build/tftp is one (pxelinux's and GRUB's defaults, per-MAC entries); the loaders, GRUB's
    modules and the installers copied from packages are left as they are.
    """
    tftp_root.mkdir(parents=True, exist_ok=True)
    with state_locked(build.parent):
        _copy_boot_entries(build, tftp_root)


def _copy_boot_entries(build: Path, tftp_root: Path) -> None:
    """build/'s boot configs into the TFTP root, except installed VMs' per-MAC entries (under the state lock)."""
    config_dir, built = build.parent, build / pxe.BUILD_DIR
    installed = {rel for vm in read_installed(config_dir) for rel in boot_entries(config_dir, vm)}

    def installed_entries(directory: str, names: list[str]) -> set[str]:
        # Never copied, rather than copied and then deleted: an installed VM booting in between would reinstall.
        where = Path(directory).relative_to(built)
        return {name for name in names if str(where / name) in installed}

    if built.is_dir():
        shutil.copytree(built, tftp_root, dirs_exist_ok=True, ignore=installed_entries,
                        copy_function=_replace_boot_entry)
    _remove_stale_boot_entries(built, tftp_root)
    # copytree leaves an installed VM's entries uncopied, but cannot remove one that an older deploy put there:
    # that happens here. `installed` can name a VM whose entry is still deployed: the file edited by hand or
    # restored, or a mark stopped between writing the state and unlinking the entry (set_installed).
    for rel in installed:
        (tftp_root / rel).unlink(missing_ok=True)


def _replace_boot_entry(src: str, dst: str) -> None:
    """copytree's copy: a boot config is replaced whole (a new file renamed over it), never rewritten in place,
    where a VM reading it over TFTP meanwhile would get it cut short; one unchanged is left as it is."""
    with contextlib.suppress(FileNotFoundError):
        if Path(dst).read_bytes() == Path(src).read_bytes():
            return
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(dst).name}.", suffix=".new", dir=Path(dst).parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)  # TFTP serves world-readable files only
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale_boot_entries(built: Path, tftp_root: Path) -> None:
    """Per-MAC boot configs that the build no longer has: VMs removed from cluster.conf, or whose MAC changed.

    Left behind, such an entry would install over whatever machine later boots with that MAC.
    """
    for directory in pxe.PER_MAC_DIRS:
        if not (tftp_root / directory).is_dir():
            continue
        for path in (tftp_root / directory).iterdir():
            rel = f"{directory}/{path.name}"
            if pxe.PER_MAC_ENTRY.fullmatch(rel) and not (built / rel).exists():
                path.unlink()


def forget_removed_installed(config_dir: Path) -> None:
    """Drop the install marks of VMs that the build no longer has (removed from cluster.conf, or renamed).

    A mark is for the disk that was installed: a VM given that name later has a new, empty one and needs its
    installer, which a mark left behind keeps from it (PXE reads the local-boot default; the disk boots nothing).
    Called once a deploy has succeeded: one that fails puts back the previous build, whose VMs keep their marks.
    """
    with state_locked(config_dir):
        installed = read_installed(config_dir)
        kept = {vm for vm in installed if boot_entries(config_dir, vm)}
        if kept != installed:
            write_installed(config_dir, kept)


def set_installed(config_dir: Path, tftp_root: Path, vm: str, done: bool) -> bool:
    """Mark a VM's install done (remove its boot entries) or to be redone (restore them). False: no such VM."""
    if not vm or "/" in vm or "\0" in vm or vm.startswith("."):  # NUL: from the URL's %00, no file name has it
        return False
    entries = boot_entries(config_dir, vm)
    if not entries:
        return False
    with state_locked(config_dir):
        installed = read_installed(config_dir)
        write_installed(config_dir, installed | {vm} if done else installed - {vm})
        for rel in entries:
            built = build_dir_in(config_dir) / pxe.BUILD_DIR / rel
            if done:
                (tftp_root / rel).unlink(missing_ok=True)
            elif built.is_file():
                _copy_if_changed(built, tftp_root / rel)
    return True
