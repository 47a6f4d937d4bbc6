"""`invoke status`'s parts that libvirt's test driver (test:///default, real libvirt code in this process) can show."""

from __future__ import annotations

import re
import uuid

import libvirt

from kvmconf.status import state_of


def test_a_domain_undefined_after_it_was_listed_is_left_out_and_a_listed_one_has_its_state() -> None:
    conn = libvirt.open("test:///default")
    try:
        xml = conn.lookupByName("test").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        xml = re.sub(r"<uuid>[^<]*</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", xml.replace("<name>test</name>",
                                                                                        "<name>going</name>"))
        conn.defineXML(xml)
        listed = {dom.name(): dom for dom in conn.listAllDomains()}
        conn.lookupByName("going").undefine()  # by another admin, while status runs: the object listed stays
        assert state_of(listed["going"]) is None
        assert state_of(listed["test"]) == "running"
    finally:
        conn.close()
