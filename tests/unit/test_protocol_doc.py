"""docs/PROTOCOL.md describes every message kind and every field, so a client in another
language can be written from it alone."""

import dataclasses
import re
from pathlib import Path

import pytest

from virtbroker.common import protocol as p

DOC = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()


def _sections() -> dict[bytes, str]:
    """The document's "## ... (`VBx1`)" sections, by protocol version."""
    out = {}
    for part in re.split(r"(?m)^## ", DOC):
        match = re.search(r"\(`(VB[CWE]1)`\)", part.splitlines()[0]) if part else None
        if match:
            out[match.group(1).encode()] = part
    return out


@pytest.mark.parametrize("key", sorted(p.kinds()), ids=lambda k: f"{k[0].decode()}-{k[1]}")
def test_every_kind_and_field_is_documented(key):
    version, kind = key
    section = _sections().get(version)
    assert section is not None, f"docs/PROTOCOL.md has no section for {version.decode()}"
    body = next((b for b in re.split(r"(?m)^### ", section) if b.startswith(f"`{kind}`")), None)
    assert body is not None, f"docs/PROTOCOL.md: no heading for {version.decode()} `{kind}`"
    missing = [f.name for f in dataclasses.fields(p.kinds()[key]) if f"`{f.name}`" not in body]
    assert not missing, f"docs/PROTOCOL.md: {version.decode()} `{kind}` does not describe {missing}"
