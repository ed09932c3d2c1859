"""Hypothesis strategies for virtbroker's wire: msgpack values, bodies shaped like each message kind, frames."""

from __future__ import annotations

import dataclasses
import types
import typing

import msgpack
from hypothesis import strategies as st

from virtbroker.common import protocol as p

INT_EDGES = [0, -1, 1, 2**31, 2**32, p.MAX_INT, p.MAX_INT + 1, -p.MAX_INT, -(2**63), 2**64 - 1]
NAME_POOL = ["fz-existing", "fz-other", "", "/", "nope", "00000000-0000-0000-0000-000000000000", "\u2603", "a" * 300]

ints = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.sampled_from(INT_EDGES))
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(st.text(max_size=40), st.sampled_from(NAME_POOL))
exts = st.one_of(
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999)),
)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=40), exts)

# Any msgpack value, nested a few levels (deep nesting has its own strategy below).
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(texts, st.sampled_from(["request_id", "worker_id", "job_id", "xml"])), children,
                        max_size=5),
    ),
    max_leaves=25,
)


def _typed(hint) -> st.SearchStrategy:
    """A value of the field's declared type, with edge cases, or any value at all."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_typed(h) for h in typing.get_args(hint)])
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return ints
    if hint is float:
        return st.one_of(floats, ints)
    if hint is str:
        return texts
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return st.lists(_typed(args[0]) if args else values, max_size=6)
    if origin is dict or hint is dict:
        return st.dictionaries(texts, values, max_size=5)
    return values


def body_for(
    cls: type[p.Message], extra_names: dict[str, st.SearchStrategy] | None = None, strict: bool = False
) -> st.SearchStrategy:
    """A map shaped like cls, plus extra keys. Each field is present or missing, well typed
    or any value; strict: required fields always present and every field of its declared
    type, so that most messages pass decode and reach their handler."""
    hints = typing.get_type_hints(cls)
    fields = {}
    overrides = extra_names or {}
    for f in dataclasses.fields(cls):
        typed = overrides[f.name] if f.name in overrides else _typed(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if strict:
            fields[f.name] = typed if required else st.one_of(st.just(dataclasses.MISSING), typed)
        else:
            fields[f.name] = st.one_of(st.just(dataclasses.MISSING), typed, typed, values)

    @st.composite
    def build(draw):
        body = {}
        for name, strategy in fields.items():
            value = draw(strategy)
            if value is not dataclasses.MISSING:
                body[name] = value
        body.update(draw(st.dictionaries(texts, values, max_size=3)))
        return body

    return build()


def deep(depth: int) -> bytes:
    """A msgpack body nested `depth` arrays deep (built by hand: packb refuses past 511)."""
    return b"\x91" * depth + b"\xc0"


def packed(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@st.composite
def frames_for(draw, version: bytes, kinds: list[str], field_overrides=None) -> list[bytes]:
    """One multipart message: mostly [version, kind, body], with every way of getting it wrong."""
    kind_name = draw(st.one_of(st.sampled_from(kinds), st.sampled_from(kinds), st.text(max_size=12)))
    kind_cls = p.kinds().get((version, kind_name))
    if kind_cls is not None:
        body_value = draw(st.one_of(body_for(kind_cls, field_overrides), body_for(kind_cls, field_overrides), values))
    else:
        body_value = draw(values)
    body = packed(body_value)
    body = draw(st.one_of(
        st.just(body), st.just(body), st.just(body),
        st.just(body[: max(0, len(body) - 1)]),  # truncated
        st.integers(0, max(0, len(body) - 1)).map(lambda n: body[:n]),
        st.binary(max_size=64),  # not msgpack at all
        st.integers(100, 5000).map(deep),  # deep nesting
        st.just(b"\xcf" + b"\xff" * 8),  # uint64 max, not a map
        st.just(b"\xc1"),  # the one byte msgpack never uses
    ))
    kind = kind_name.encode()
    kind = draw(st.one_of(st.just(kind), st.just(kind), st.just(kind), st.just(b"\xff\xfe"), st.binary(max_size=8)))
    ver = draw(st.one_of(st.just(version), st.just(version), st.just(version), st.sampled_from(
        [p.CLIENT_VERSION, p.WORKER_VERSION, p.EVENT_VERSION, b"", b"VBC2"]), st.binary(max_size=8)))
    frames = [ver, kind, body]
    shape = draw(st.sampled_from(["ok"] * 6 + ["drop", "extra", "empty-frame"]))
    if shape == "drop":
        del frames[draw(st.integers(0, 2)):]
        frames = frames or [b""]
    elif shape == "extra":
        frames += draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))
    elif shape == "empty-frame":
        frames.insert(draw(st.integers(0, 3)), b"")
    return frames
