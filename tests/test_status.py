"""`invoke status`'s parts that libvirt's test driver (test:///default, real libvirt code in this process) can show."""

from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

import libvirt

from generators.model import Cluster
from kvmconf.connection import connections
from kvmconf.provision import Options, provision
from kvmconf.status import state_of, status
from tests.test_provision import Recorder, on_test_driver, quiet


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


def test_a_running_vm_whose_mac_was_changed_is_said_to_run_with_the_old_one_until_restarted(
        example: Cluster, tmp_path: Path) -> None:
    """After `provision --apply` of a new MAC, the running guest keeps its old NIC until it is started again: the
    DHCP reservation made for the new MAC does not match it, yet status said only what the definition holds."""
    cluster = on_test_driver(example, tmp_path)
    new_mac = "52:54:00:50:00:99"
    changed = dataclasses.replace(cluster, vms=tuple(dataclasses.replace(vm, mac=new_mac) if vm.name == "db" else vm
                                                    for vm in cluster.vms))
    with connections(cluster, execute=Recorder()) as conns:
        provision(cluster, ["db"], conns, log=quiet)
        old_mac = cluster.vm("db").mac
        provision(changed, ["db"], conns, Options(apply=True), log=quiet)
        [kvm0] = status(changed, conns, ["kvm0"])
        [db] = [vm for vm in kvm0.vms if vm.name == "db"]
        assert db.state == "running"
        # (The test driver makes up the disk's size: that drift is left out here.)
        assert [d for d in db.drift if "MAC" in d] == [
            f"running with MAC {old_mac} until restarted (definition: {new_mac})"]
        dom = conns.get("kvm0").lookupByName("db")
        dom.destroy()
        dom.create()
        [kvm0] = status(changed, conns, ["kvm0"])
        assert [d for vm in kvm0.vms if vm.name == "db" for d in vm.drift if "MAC" in d] == []
