"""Hostile domain definitions sent to a real broker: each is refused as invalid and changes nothing.

XML bombs, external entities, invalid names, oversize definitions, definitions that break
libvirt's domain schema, random text, and random mutations of a valid definition. After each
refusal `list --all` is exactly what it was before.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from virtbroker.client.templates import minimal_domain_xml
from virtbroker.common import protocol as p
from virtbroker.common.domxml import MAX_NAME_CHARS, MAX_XML_BYTES
from virtbroker.common.errors import ConflictError, InvalidError

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE domain ['
    '<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    + "".join(f'<!ENTITY lol{i} "' + f"&lol{i - 1};" * 10 + '">' for i in range(2, 10))
    + ']><domain type="test"><name>bomb</name><description>&lol9;</description></domain>'
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    '<domain type="test"><name>xxe</name><description>&xxe;</description></domain>'
)
PARAMETER_ENTITY = (
    '<!DOCTYPE domain [<!ENTITY % ext SYSTEM "file:///etc/passwd"> %ext;]>'
    '<domain type="test"><name>pe</name></domain>'
)
XINCLUDE = (
    '<domain type="test" xmlns:xi="http://www.w3.org/2001/XInclude"><name>xi</name>'
    '<xi:include href="file:///etc/passwd" parse="text"/><memory>65536</memory><os><type>hvm</type></os></domain>'
)


def utf7(text: str) -> str:
    """Encode the markup characters of text in UTF-7, so '<!DOCTYPE' never appears as bytes."""
    out = []
    for ch in text:
        if ch in '<!>&%;[]"=':
            out.append("+" + base64.b64encode(ch.encode("utf-16-be")).decode().rstrip("=") + "-")
        else:
            out.append(ch)
    return '<?xml version="1.0" encoding="UTF-7"?>' + "".join(out)


UTF7_EXTERNAL_ENTITY = utf7(
    '<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">'
    '<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    '<domain type="test"><name>u7</name><memory>65536</memory><os><type>hvm</type></os></domain>'
)


@pytest.fixture(scope="module")
def broker(fuzz_broker):
    c = fuzz_broker.probe_client
    c.define(minimal_domain_xml("fzd-existing", uuid="d0000000-0000-4000-8000-000000000001"))
    fuzz_broker.baseline = fuzz_broker.probe()
    return fuzz_broker


def assert_refused(broker, xml: str, *fragments: str) -> InvalidError:
    with pytest.raises(InvalidError) as info:
        broker.probe_client.define(xml)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    assert broker.probe() == broker.baseline
    return info.value


def test_billion_laughs_is_refused(broker):
    assert_refused(broker, BILLION_LAUGHS, "DOCTYPE")


@pytest.mark.parametrize("xml", [EXTERNAL_ENTITY, PARAMETER_ENTITY], ids=["system-entity", "parameter-entity"])
def test_external_entities_are_refused(broker, xml):
    assert_refused(broker, xml, "DOCTYPE")


def test_xinclude_is_not_followed(broker):
    """lxml only follows XInclude when asked; the schema refuses the unknown element."""
    error = assert_refused(broker, XINCLUDE)
    assert "root:x:0:0" not in error.message


def test_a_doctype_hidden_by_utf7_is_refused_too(broker):
    """parse() refuses DOCTYPE and ENTITY by looking for their bytes, but libxml2 honours
    the encoding the XML declaration names: in UTF-7 the declaration carries no '<!DOCTYPE'
    bytes, and the definition (with an external entity declared) is accepted. Nothing is
    expanded (resolve_entities=False), but the promise "refuses DTDs and entities outright"
    does not hold; the parsed tree's docinfo shows the DTD."""
    c = broker.probe_client
    try:
        record = c.define(UTF7_EXTERNAL_ENTITY)
    except InvalidError:
        assert broker.probe() == broker.baseline
        return
    try:
        stored = c.dumpxml(record["name"])
        assert "root:x:0:0" not in stored and "aaaaaaaaaa" not in stored  # at least nothing was expanded
    finally:
        c.wait([c.submit(record["name"], "undefine")["job_id"]], 10)
    pytest.fail(f"a UTF-7 encoded DOCTYPE with an external entity was accepted as {record['name']}")


@pytest.mark.parametrize(
    "name",
    ["", "   ", "a/b", "/", "a\tb", "a\nb", "a\x7fb", "x" * (MAX_NAME_CHARS + 1)],
    ids=["empty", "blank", "slash", "only-slash", "tab", "newline", "del", "too-long"],
)
def test_invalid_names_are_refused(broker, name):
    assert_refused(broker, minimal_domain_xml(name), "name")


def test_name_with_a_control_character_reference_is_refused(broker):
    assert_refused(broker, minimal_domain_xml("ctl").replace("<name>ctl</name>", "<name>a&#1;b</name>"))


def test_longest_name_is_accepted_and_undefined(broker):
    c = broker.probe_client
    name = "n" * MAX_NAME_CHARS
    assert c.define(minimal_domain_xml(name))["name"] == name
    assert c.wait([c.submit(name, "undefine")["job_id"]], 10)[0]["state"] == "succeeded"
    assert broker.probe() == broker.baseline


def test_oversize_definition_is_refused(broker):
    base = minimal_domain_xml("big")
    pad = MAX_XML_BYTES + 1 - len(base.encode()) - len("<!---->")
    xml = base.replace("</domain>", f"<!--{'p' * pad}--></domain>")
    assert len(xml.encode()) == MAX_XML_BYTES + 1
    assert_refused(broker, xml, "more than the limit")
    # Well past the definition limit yet under the frame limit: still an 'invalid', not a protocol error.
    big = base.replace("</domain>", f"<!--{'q' * (MAX_XML_BYTES + MAX_XML_BYTES // 2)}--></domain>")
    assert len(big.encode()) < p.MAX_FRAME_BYTES
    assert_refused(broker, big, "more than the limit")


@pytest.mark.parametrize(
    "xml",
    [
        minimal_domain_xml("schema-vcpu").replace("<vcpu>1</vcpu>", "<vcpu>abc</vcpu>"),
        minimal_domain_xml("schema-dev", "kvm").replace("<devices>", "<devices><bogus/>"),
        minimal_domain_xml("schema-mem").replace("<memory unit='MiB'>64</memory>", "<memory unit='MiB'>-1</memory>"),
        minimal_domain_xml("schema-root").replace("<os>", "<nonsense/><os>"),
    ],
    ids=["vcpu-abc", "unknown-device", "negative-memory", "unknown-element"],
)
def test_definitions_broken_against_the_schema_are_refused_at_define(broker, xml):
    assert_refused(broker, xml, "schema")


@FUZZ
@given(xml=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_random_text_is_refused(broker, xml):
    assert_refused(broker, xml)
    broker.stats.messages += 1


TEMPLATE = minimal_domain_xml("fzd-mutant")


@st.composite
def mutants(draw) -> str:
    """The valid template with a few random cuts, insertions and replacements."""
    xml = TEMPLATE
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(xml)))
        how = draw(st.sampled_from(["cut", "insert", "replace"]))
        if how == "cut":
            xml = xml[:at] + xml[at + draw(st.integers(1, 20)):]
        elif how == "insert":
            piece = draw(st.one_of(st.text(max_size=12), st.sampled_from(
                ["<", ">", "&", "&amp;", "]]>", "<!--", "'", '"', "</domain>", "<domain>", "<name>x</name>",
                 "<uuid>zz</uuid>", "<devices/>", "\x00", "\ud7ff", "<![CDATA[x]]>", "<?pi x?>"])))
            xml = xml[:at] + piece + xml[at:]
        else:
            xml = xml[:at] + draw(st.characters()) + xml[at + 1:]
    return xml


@FUZZ
@given(xml=mutants())
def test_mutated_definitions_are_refused_or_stored_whole(broker, xml):
    """Either refused as invalid (or a conflict with the existing domain) and nothing
    changes, or accepted: then the stored definition reads back and is undefined again."""
    c = broker.probe_client
    broker.stats.messages += 1
    try:
        record = c.define(xml)
    except (InvalidError, ConflictError):
        assert broker.probe() == broker.baseline
        return
    try:
        assert c.lookup(record["uuid"])["name"] == record["name"]
        assert f"<uuid>{record['uuid']}</uuid>" in c.dumpxml(record["uuid"])
    finally:
        if record["name"] != "fzd-existing":
            c.wait([c.submit(record["uuid"], "undefine")["job_id"]], 10)
    assert [(d["name"], d["uuid"]) for d in broker.probe()] == [(d["name"], d["uuid"]) for d in broker.baseline]
