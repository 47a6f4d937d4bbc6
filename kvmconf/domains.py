"""Domains through libvirt: look up, compare with the generated XML, define, start, stop, undefine.

Comparing follows "preserve the admin's intent" (terraform-provider-libvirt's rule): libvirt fills
in many defaults (PCI addresses, controllers, ``placement='static'``), so the live definition
(``XMLDesc(VIR_DOMAIN_XML_INACTIVE)``) is projected onto the shape of the generated XML, and only
what the generated XML says is compared. Units and machine aliases are normalised the way libvirt
does, so an unchanged domain shows no diff, and a manual change to anything kvmconf sets does.
"""

from __future__ import annotations

import copy
import difflib
import xml.etree.ElementTree as ET
from collections.abc import Callable

import libvirt

# Multipliers to KiB, libvirt's unit for memory in the XML it returns.
_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "kb": 1000 / 1024, "k": 1, "kib": 1, "mb": 1000**2 / 1024, "m": 1024,
        "mib": 1024, "gb": 1000**3 / 1024, "g": 1024**2, "gib": 1024**2, "tb": 1000**4 / 1024, "t": 1024**3,
        "tib": 1024**3}
_MEMORY_TAGS = ("memory", "currentMemory", "maxMemory")
# Devices an admin may add by hand that a redefinition from the generated XML would drop: shown in the diff.
_SHOWN_EXTRA_DEVICES = ("disk", "interface", "hostdev", "filesystem")
# Per-definition noise libvirt adds to devices, left out when an extra device is shown.
_NOISE = ("address", "alias")
# Lists whose order is their meaning, compared by position.
_ORDERED = ("boot",)


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def inactive_xml(dom: libvirt.virDomain) -> str:
    """The persistent definition (what the next boot uses), not the running state."""
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def machine_aliases(conn: libvirt.virConnect) -> dict[tuple[str, str], str]:
    """(arch, alias) -> canonical machine type, e.g. ('x86_64', 'pc') -> 'pc-i440fx-7.2'."""
    aliases = {}
    for arch in ET.fromstring(conn.getCapabilities()).iter("arch"):
        for machine in arch.iter("machine"):
            if machine.get("canonical") and machine.text:
                aliases[(arch.get("name", ""), machine.text)] = machine.get("canonical", "")
    return aliases


def normalise(xml: str, aliases: dict[tuple[str, str], str]) -> ET.Element:
    """The definition as libvirt would store it, without the UUID (which kvmconf never changes)."""
    root = ET.fromstring(xml)
    for tag in _MEMORY_TAGS:
        for element in root.findall(tag):
            unit = element.get("unit", "KiB").lower()
            if unit in _KIB and element.text:
                element.text = str(round(int(element.text.strip()) * _KIB[unit]))
                element.set("unit", "KiB")
    os_type = root.find("os/type")
    if os_type is not None and os_type.get("machine"):
        key = (os_type.get("arch", ""), os_type.get("machine", ""))
        os_type.set("machine", aliases.get(key, key[1]))
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    for element in root.iter():
        if element.text is not None:
            element.text = element.text.strip() or None
        element.tail = None
    return root


def _device_key(element: ET.Element) -> str | None:
    """Devices are matched by identity, not position: libvirt sorts disks by target, for one."""
    if element.tag == "disk":
        target = element.find("target")
        return None if target is None else f"disk:{target.get('dev')}"
    if element.tag == "interface":
        mac = element.find("mac")
        return None if mac is None else f"interface:{mac.get('address', '').lower()}"
    if element.tag == "controller":
        # libvirt adds implicit controllers (pcie-root, sata, ...) around the ones we ask for.
        return f"controller:{element.get('type')}:{element.get('index', '0')}"
    return None


def project(live: ET.Element, wanted: ET.Element) -> ET.Element:
    """``live`` reduced to the elements and attributes ``wanted`` has (plus extra devices that matter)."""
    out = ET.Element(live.tag, {k: v for k, v in live.attrib.items() if k in wanted.attrib})
    if live.text is not None and wanted.text is not None:
        out.text = live.text.strip() or None
    keyed = {key: child for child in live if (key := _device_key(child)) is not None}
    used: set[int] = set()
    for child in wanted:
        key = _device_key(child)
        if key is not None:
            match = keyed.get(key)
        else:
            unused = [c for c in live if c.tag == child.tag and id(c) not in used]
            # libvirt reorders some lists (firmware features, ...): prefer the element with the same
            # attributes, except where order is the meaning (<boot dev=.../> is the boot order).
            same = [c for c in unused if child.tag not in _ORDERED and _same_attributes(c, child)]
            match = (same or unused)[0] if same or unused else None
        if match is not None and id(match) not in used:
            used.add(id(match))
            out.append(project(match, child))
    if live.tag == "devices":
        for child in live:
            if id(child) not in used and child.tag in _SHOWN_EXTRA_DEVICES:
                out.append(_without_noise(child))
    return out


def _same_attributes(live: ET.Element, wanted: ET.Element) -> bool:
    return all(live.get(name) == value for name, value in wanted.attrib.items())


def _without_noise(element: ET.Element) -> ET.Element:
    clean = copy.deepcopy(element)
    for parent in clean.iter():
        for child in list(parent):
            if child.tag in _NOISE:
                parent.remove(child)
    return clean


def to_text(element: ET.Element) -> list[str]:
    for node in element.iter():
        if node.text is not None:
            node.text = node.text.strip() or None
        node.tail = None
    ET.indent(element, "  ")
    return ET.tostring(element, encoding="unicode").splitlines()


def definition_diff(live_xml: str, new_xml: str, aliases: dict[tuple[str, str], str], name: str) -> list[str]:
    """Unified diff from the defined domain to the generated XML; empty when nothing kvmconf sets differs."""
    wanted = normalise(new_xml, aliases)
    live = normalise(live_xml, aliases)
    before, after = to_text(project(live, wanted)), to_text(wanted)
    if before == after:
        return []
    return list(difflib.unified_diff(before, after, f"{name} (defined now)", f"{name} (from cluster.conf)",
                                     lineterm="", n=2))


def disk_sources(xml: str) -> dict[str, str]:
    """Target device (``vda``) -> the file or block device behind it, for every disk of a definition that has one."""
    sources = {}
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        path = None if source is None else source.get("file") or source.get("dev")
        if target is not None and target.get("dev") and path:
            sources[target.get("dev", "")] = path
    return sources


def uuid_of(xml: str) -> str | None:
    element = ET.fromstring(xml).find("uuid")
    return None if element is None or not element.text else element.text.strip()


def with_uuid(xml: str, uuid: str) -> str:
    """The generated XML carrying the defined domain's UUID: redefining never changes a UUID."""
    if uuid_of(xml) == uuid:
        return xml
    root = ET.fromstring(xml)
    element = root.find("uuid")
    if element is None:
        element = ET.Element("uuid")
        root.insert(1, element)
    element.text = uuid
    return ET.tostring(root, encoding="unicode")


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    return conn.defineXML(xml)


def is_active(dom: libvirt.virDomain) -> bool:
    return bool(dom.isActive())


def start(dom: libvirt.virDomain) -> bool:
    """Start a shut-off domain; False when it was running already."""
    if is_active(dom):
        return False
    dom.create()
    return True


def shutdown(dom: libvirt.virDomain) -> bool:
    """Ask the guest to shut down (ACPI); False when it was not running."""
    if not is_active(dom):
        return False
    dom.shutdown()
    return True


def power_off(dom: libvirt.virDomain) -> bool:
    """Pull the plug (``virsh destroy``); the disk is untouched. False when it was not running."""
    if not is_active(dom):
        return False
    try:
        dom.destroy()
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
            raise
    return True


def undefine(dom: libvirt.virDomain, keep_nvram: bool) -> None:
    """Remove the definition with its snapshot/checkpoint metadata; UEFI variables only when not kept."""
    nvram = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM if keep_nvram else libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    full = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | nvram)
    # Older or simpler drivers (the test driver among them) refuse some flags: fall back step by step.
    attempts: list[Callable[[], object]] = [
        lambda: dom.undefineFlags(full),
        lambda: dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA),
    ]
    for attempt in attempts[:-1]:
        try:
            attempt()
            return
        except libvirt.libvirtError as err:
            if err.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                raise
    attempts[-1]()


def set_autostart(dom: libvirt.virDomain, on: bool) -> bool:
    """Set autostart; True when it changed."""
    if bool(dom.autostart()) == on:
        return False
    dom.setAutostart(1 if on else 0)
    return True
