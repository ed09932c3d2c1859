"""Domain XML: safe parsing, name and UUID rules, and the edits the broker and workers make."""

import functools
import os
import re
import uuid as uuidlib

from lxml import etree

from virtbroker.common.errors import InvalidError

MAX_XML_BYTES = 1024 * 1024
MAX_NAME_CHARS = 200

# Entity expansion, DTD loading and network access are off: a definition is data, never a
# program (billion laughs, external entities). huge_tree stays off so lxml's own depth and
# size limits apply too.
_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_blank_text=False,
)

SCHEMA_PATH = os.environ.get("VIRTBROKER_DOMAIN_SCHEMA", "/usr/share/libvirt/schemas/domain.rng")

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def parse(xml: str | bytes) -> etree._Element:
    """Parse domain XML or raise InvalidError; refuses DTDs and entities outright."""
    data = xml.encode() if isinstance(xml, str) else xml
    if len(data) > MAX_XML_BYTES:
        raise InvalidError(f"definition is {len(data)} bytes, more than the limit of {MAX_XML_BYTES}")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InvalidError("definition contains a DOCTYPE or entity declaration, which is not allowed")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as e:
        raise InvalidError(f"definition is not well-formed XML: {e}") from e
    # The byte check above misses a DOCTYPE in another encoding (UTF-7, UTF-16): ask the parser.
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise InvalidError("definition contains a DOCTYPE or entity declaration, which is not allowed")
    if root.tag != "domain":
        raise InvalidError(f"expected a <domain> root element, got <{root.tag}>")
    if not root.get("type"):
        raise InvalidError("<domain> needs a type attribute (kvm, qemu, test, ...)")
    return root


def check_name(name: str | None) -> str:
    """Apply libvirt's rules for domain names, plus a length limit."""
    if name is None or name.strip() == "":
        raise InvalidError("domain name is missing or empty")
    if "/" in name:
        raise InvalidError(f"domain name {name!r} contains '/'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidError(f"domain name {name!r} contains control characters")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidError(f"domain name is {len(name)} characters, more than {MAX_NAME_CHARS}")
    return name


def normalize_uuid(text: str) -> str:
    """Return a UUID in canonical lower-case dashed form, or raise InvalidError."""
    text = text.strip()
    if not _UUID_RE.match(text):
        raise InvalidError(f"malformed UUID {text!r}")
    return str(uuidlib.UUID(text))


def looks_like_uuid(text: str) -> bool:
    return bool(_UUID_RE.match(text.strip()))


@functools.lru_cache(maxsize=1)
def _schema(path: str) -> etree.RelaxNG:
    # libvirt0 ships the schema beside the library libvirt-python links against. It is
    # loaded once per process: loading it costs far more than validating a definition.
    try:
        return etree.RelaxNG(etree.parse(path, _PARSER))
    except (OSError, etree.LxmlError) as e:
        raise InvalidError(f"cannot load libvirt's domain schema {path}: {e}") from e


def validate(root: etree._Element, schema_path: str = SCHEMA_PATH) -> None:
    """Check a definition against libvirt's RelaxNG schema, so it fails at define, not at start."""
    schema = _schema(schema_path)
    if not schema.validate(root):
        first = schema.error_log[0] if len(schema.error_log) else None
        where = f" (at {first.path})" if first is not None and first.path else ""
        detail = first.message if first is not None else "invalid"
        raise InvalidError(f"definition does not match libvirt's domain schema: {detail}{where}")


class Definition:
    """A parsed, checked definition: name, UUID (generated if absent, as libvirt does) and XML."""

    __slots__ = ("name", "uuid", "xml", "root")

    def __init__(self, name: str, uuid: str, xml: str, root: etree._Element):
        self.name = name
        self.uuid = uuid
        self.xml = xml
        self.root = root


def load_definition(xml: str | bytes) -> Definition:
    root = parse(xml)
    name_el = root.find("name")
    name = check_name(name_el.text if name_el is not None else None)
    uuid_el = root.find("uuid")
    if uuid_el is None or not (uuid_el.text or "").strip():
        if uuid_el is None:
            uuid_el = etree.Element("uuid")
            name_el.addnext(uuid_el)
            uuid_el.tail = name_el.tail
        uuid_el.text = str(uuidlib.uuid4())
    uuid = normalize_uuid(uuid_el.text)
    uuid_el.text = uuid
    validate(root)
    text = etree.tostring(root, encoding="unicode")
    return Definition(name, uuid, text, root)


def with_static_dac_label(xml: str, uid: int, gid: int) -> str:
    """Add a static DAC seclabel with relabel='no', so libvirt runs QEMU as uid:gid and labels nothing.

    virtbroker's security workers have labelled every resource already; libvirt must not
    relabel (or later restore) what they did. Any existing DAC seclabel is replaced.
    """
    root = parse(xml)
    for old in root.findall("seclabel"):
        if old.get("model") == "dac":
            root.remove(old)
    label = etree.SubElement(root, "seclabel", type="static", model="dac", relabel="no")
    etree.SubElement(label, "label").text = f"+{uid}:+{gid}"
    return etree.tostring(root, encoding="unicode")


def with_static_label(xml: str, model: str, label_text: str) -> str:
    """Add a static seclabel for another model (apparmor: the profile name), relabel='no'."""
    root = parse(xml)
    for old in root.findall("seclabel"):
        if old.get("model") == model:
            root.remove(old)
    label = etree.SubElement(root, "seclabel", type="static", model=model, relabel="no")
    etree.SubElement(label, "label").text = label_text
    return etree.tostring(root, encoding="unicode")


_MEMORY_UNITS_KIB = {
    "b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
    "mb": 1000**2 / 1024, "g": 1024**2, "gib": 1024**2, "gb": 1000**3 / 1024, "t": 1024**3, "tib": 1024**3,
    "tb": 1000**4 / 1024,
}


@functools.lru_cache(maxsize=4096)
def memory_mib(xml: str) -> int:
    """The guest's memory in MiB, as libvirt reads `<memory unit=...>` (default KiB); 0 if absent.

    Cached by definition text: placement asks again each turn a start waits for a slot.
    """
    el = parse(xml).find("memory")
    if el is None or not (el.text or "").strip():
        return 0
    try:
        kib = float(el.text.strip()) * _MEMORY_UNITS_KIB[(el.get("unit") or "KiB").lower()]
    except (ValueError, KeyError):
        return 0
    return int(kib // 1024)


# virtbroker's own element in a domain's <metadata> (libvirt keeps one element per namespace
# and never looks inside). `ha="yes"` marks a domain HA; the lifecycle worker puts the element
# into every guest it starts, so a host can tell the guests virtbroker placed from any other
# (self-fencing destroys those alone).
METADATA_NS = "urn:virtbroker:domain:1"
METADATA_TAG = f"{{{METADATA_NS}}}domain"


def _metadata_element(root: etree._Element, create: bool) -> etree._Element | None:
    metadata = root.find("metadata")
    if metadata is None:
        if not create:
            return None
        metadata = etree.SubElement(root, "metadata")
    el = metadata.find(METADATA_TAG)
    if el is None and create:
        el = etree.SubElement(metadata, METADATA_TAG, nsmap={"vb": METADATA_NS})
    return el


@functools.lru_cache(maxsize=4096)
def is_ha(xml: str) -> bool:
    """Does the definition mark the domain HA (restart elsewhere once its host is fenced)?"""
    el = _metadata_element(parse(xml), create=False)
    return el is not None and el.get("ha") == "yes"


def with_ha(xml: str, ha: bool) -> str:
    """The definition with its HA mark set or cleared; the same text if nothing changes."""
    if is_ha(xml) == ha:
        return xml
    root = parse(xml)
    el = _metadata_element(root, create=True)
    if ha:
        el.set("ha", "yes")
    else:
        el.attrib.pop("ha", None)
    return etree.tostring(root, encoding="unicode")


@functools.lru_cache(maxsize=4096)
def with_placed_mark(xml: str) -> str:
    """The definition a lifecycle worker starts: with virtbroker's metadata element.

    Cached by definition text: a guest started again and again is parsed once."""
    root = parse(xml)
    if _metadata_element(root, create=False) is not None:
        return xml
    _metadata_element(root, create=True)
    return etree.tostring(root, encoding="unicode")


@functools.lru_cache(maxsize=4096)
def disk_sources(xml: str) -> tuple[str, ...]:
    """The files and block devices of the domain's disks (their <source file|dev>), in order."""
    out = []
    for source in parse(xml).iterfind("devices/disk/source"):
        path = source.get("file") or source.get("dev")
        if path:
            out.append(path)
    return tuple(out)
