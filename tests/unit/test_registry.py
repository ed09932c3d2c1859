"""libvirt's define rules and name/UUID resolution in the broker's registry."""

import pytest

from virtbroker.broker.registry import Registry
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import domxml
from virtbroker.common.errors import ConflictError, InvalidError, NotFoundError

U1 = "11111111-2222-3333-4444-555555555555"
U2 = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def define(reg, name, uuid=None):
    return reg.define(domxml.load_definition(minimal_domain_xml(name, uuid=uuid)))


def test_definition_without_uuid_gets_one():
    d = domxml.load_definition(minimal_domain_xml("a"))
    assert domxml.looks_like_uuid(d.uuid)
    assert f"<uuid>{d.uuid}</uuid>" in d.xml


def test_name_taken_by_other_uuid_is_refused_naming_it():
    reg = Registry()
    define(reg, "a", U1)
    with pytest.raises(ConflictError, match=U1):
        define(reg, "a", U2)


def test_uuid_taken_under_other_name_is_refused():
    reg = Registry()
    define(reg, "a", U1)
    with pytest.raises(ConflictError, match="already defined with uuid"):
        define(reg, "b", U1)


def test_same_name_and_uuid_redefines():
    reg = Registry()
    record, created = define(reg, "a", U1)
    assert created
    record.state = "running"
    again, created = reg.define(domxml.load_definition(minimal_domain_xml("a", uuid=U1, memory_mib=128)))
    assert not created and again is record
    assert again.generation == 2 and "128" in again.xml and again.state == "running"


def test_resolve_by_name_or_uuid_in_any_case():
    reg = Registry()
    define(reg, "a", U1)
    assert reg.resolve("a").uuid == U1
    assert reg.resolve(U1.upper()).name == "a"
    with pytest.raises(NotFoundError):
        reg.resolve("b")


@pytest.mark.parametrize("name", ["", " ", "a/b", "tab\there", "x" * 201])
def test_invalid_names_are_refused(name):
    with pytest.raises(InvalidError):
        domxml.load_definition(minimal_domain_xml(name))


@pytest.mark.parametrize(
    "xml",
    [
        "<domain type='kvm'><name>a</name>",  # not well-formed
        "<vm><name>a</name></vm>",
        "<domain><name>a</name></domain>",  # no type
        "<!DOCTYPE d [<!ENTITY x 'y'>]><domain type='kvm'><name>&x;</name></domain>",
        "<domain type='kvm'><name>a</name><uuid>not-a-uuid</uuid></domain>",
    ],
)
def test_bad_definitions_are_refused(xml):
    with pytest.raises(InvalidError):
        domxml.load_definition(xml)


def test_list_filters_like_virsh():
    reg = Registry()
    define(reg, "off")
    running, _ = define(reg, "on")
    running.state = "running"
    paused, _ = define(reg, "zz")
    paused.state = "paused"
    assert [r.name for r in reg.list()] == ["on", "zz"]
    assert [r.name for r in reg.list(include_inactive=True)] == ["off", "on", "zz"]
    assert [r.name for r in reg.list(state="shutoff")] == ["off"]
    assert [r.name for r in reg.list(state="paused")] == ["zz"]
    with pytest.raises(InvalidError):
        reg.list(state="bogus")


@pytest.mark.parametrize(
    "xml, fragment",
    [
        ("<domain type='kvm'><name>a</name><memory>1</memory><vcpu>abc</vcpu><os><type>hvm</type></os></domain>",
         "vcpu"),
        ("<domain type='kvm'><name>a</name><memory>1</memory><os><type>hvm</type></os><devices><bogus/></devices>"
         "</domain>", "devices"),
    ],
)
def test_definitions_are_checked_against_libvirts_schema(xml, fragment):
    with pytest.raises(InvalidError, match="schema") as info:
        domxml.load_definition(xml)
    assert fragment in str(info.value)
