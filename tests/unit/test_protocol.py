"""Every message kind round-trips; bad frames become one typed ProtocolError."""

import dataclasses
import typing

import msgpack
import pytest

from virtbroker.common import protocol as p
from virtbroker.common.errors import ProtocolError

SAMPLES = {str: "x", int: 7, float: 1.5, bool: True, list: [], dict: {"a": 1}}


def _sample(hint):
    if hint is typing.Any:
        return {"nested": [1, "two"]}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample(typing.get_args(hint)[0])
    if origin is list:
        arg = typing.get_args(hint)[0]
        return [_sample(arg)]
    if origin is dict:
        return {"k": "v"}
    return SAMPLES[hint]


@pytest.mark.parametrize("key", sorted(p.kinds(), key=lambda k: (k[0], k[1])), ids=lambda k: f"{k[0].decode()}-{k[1]}")
def test_every_kind_round_trips(key):
    cls = p.kinds()[key]
    hints = typing.get_type_hints(cls)
    msg = cls(**{f.name: _sample(hints[f.name]) for f in dataclasses.fields(cls)})
    if cls.VERSION == p.EVENT_VERSION:
        assert p.decode_event(p.encode_event(msg)) == msg
    else:
        assert p.decode(p.encode(msg), cls.VERSION) == msg


def test_defaults_fill_missing_optional_fields():
    frames = [p.CLIENT_VERSION, b"list", msgpack.packb({"request_id": 3})]
    assert p.decode(frames, p.CLIENT_VERSION) == p.ListDomains(request_id=3, all=False, state=None)


def test_extra_fields_are_ignored():
    frames = [p.CLIENT_VERSION, b"ping", msgpack.packb({"request_id": 1, "future": "field"})]
    assert p.decode(frames, p.CLIENT_VERSION) == p.Ping(request_id=1)


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([p.CLIENT_VERSION, b"ping"], "expected 3 frames"),
        ([b"VBX9", b"ping", msgpack.packb({"request_id": 1})], "unsupported protocol version"),
        ([p.CLIENT_VERSION, b"nope", msgpack.packb({})], "unknown message kind"),
        ([p.CLIENT_VERSION, b"\xff", msgpack.packb({})], "not ASCII"),
        ([p.CLIENT_VERSION, b"ping", b"\xc1"], "not valid msgpack"),
        ([p.CLIENT_VERSION, b"ping", msgpack.packb([1, 2])], "must be a map"),
        ([p.CLIENT_VERSION, b"define", msgpack.packb({"request_id": 1})], "missing field 'xml'"),
        ([p.CLIENT_VERSION, b"define", msgpack.packb({"request_id": "1", "xml": ""})], "wrong type"),
        ([p.CLIENT_VERSION, b"job", msgpack.packb({"request_id": 1, "job_id": True})], "wrong type"),
        ([p.CLIENT_VERSION, b"job", msgpack.packb({"request_id": 1, "job_id": 2**64 - 1})], "wrong type"),
        ([p.CLIENT_VERSION, b"wait", msgpack.packb({"request_id": 1, "job_ids": ["a"]})], "wrong type"),
        ([p.CLIENT_VERSION, b"ping", b"\x00" * (p.MAX_FRAME_BYTES + 1)], "over the limit"),
    ],
)
def test_bad_frames_raise_protocol_error(frames, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        p.decode(frames, p.CLIENT_VERSION)


def test_deep_nesting_is_refused():
    deep = "leaf"
    for _ in range(p.MAX_NESTING + 5):
        deep = [deep]
    frames = [p.CLIENT_VERSION, b"ok", msgpack.packb({"request_id": 1, "result": deep})]
    with pytest.raises(ProtocolError, match="wrong type"):
        p.decode(frames, p.CLIENT_VERSION)


def _results(count, error=None):
    return [p.Result(worker_id="w", job_id=i, lease_id=f"l-{i}", epoch=1, ok=True, error=error) for i in range(count)]


def test_a_batch_carries_its_messages_in_order():
    messages = [*_results(3), p.ResultAck(job_id=9, accepted=False, reason="stale")]
    (frames,) = p.batch_frames([p.encode(m) for m in messages])
    assert frames[1] == b"batch"
    assert p.unbatch(p.decode(frames, p.WORKER_VERSION)) == messages


def test_one_message_is_not_batched():
    encoded = [p.encode(_results(1)[0])]
    assert p.batch_frames(encoded) == encoded
    assert p.unbatch(p.decode(encoded[0], p.WORKER_VERSION)) == _results(1)


def test_batches_close_at_their_limits():
    many = [p.encode(m) for m in _results(p.BATCH_MAX_ITEMS + 1)]
    batches = [p.unbatch(p.decode(f, p.WORKER_VERSION)) for f in p.batch_frames(many)]
    assert [len(b) for b in batches] == [p.BATCH_MAX_ITEMS, 1]
    big = "x" * (p.BATCH_MAX_BYTES // 2 + 1)
    frames = p.batch_frames([p.encode(m) for m in _results(3, error=big)])
    assert len(frames) == 3  # two bodies would pass BATCH_MAX_BYTES: each goes alone
    assert all(len(f[2]) <= p.MAX_FRAME_BYTES for f in frames)


@pytest.mark.parametrize(
    "items, fragment",
    [
        ([["result"]], "each item must be"),
        ([["result", "not bytes"]], "each item must be"),
        ([["batch", msgpack.packb({"messages": []})]], "do not nest"),
        ([["result", msgpack.packb({"worker_id": "w"})]], "missing field"),
        ([["nope", msgpack.packb({})]], "unknown message kind"),
    ],
)
def test_a_bad_item_spoils_its_batch(items, fragment):
    frames = [p.WORKER_VERSION, b"batch", msgpack.packb({"messages": items}, use_bin_type=True)]
    with pytest.raises(ProtocolError, match=fragment):
        p.unbatch(p.decode(frames, p.WORKER_VERSION))


@pytest.mark.parametrize("version", [p.WORKER_VERSION, p.CLIENT_VERSION])
@pytest.mark.parametrize("count", [0, p.BATCH_MAX_ITEMS + 1])
def test_batches_are_bounded(version, count):
    items = [["ping", msgpack.packb({"request_id": 1})]] * count
    frames = [version, b"batch", msgpack.packb({"messages": items}, use_bin_type=True)]
    with pytest.raises(ProtocolError, match=f"batch of {count} messages: 1 to 1000"):
        p.unbatch(p.decode(frames, version))


def test_client_requests_travel_as_one_batch_and_come_back_in_order():
    requests = [p.Submit(request_id=i, domain=f"g{i}", op="start") for i in range(1, 4)] + [p.Ping(request_id=9)]
    (frames,) = p.batch_frames([p.encode(m) for m in requests])
    assert frames[:2] == [p.CLIENT_VERSION, b"batch"]
    decoded = p.decode(frames, p.CLIENT_VERSION)
    assert type(decoded) is p.ClientBatch
    assert p.unbatch(decoded) == requests
    # A worker kind is not a client request, in a batch as alone.
    frames = [p.CLIENT_VERSION, b"batch", msgpack.packb({"messages": [["heartbeat", msgpack.packb({})]]})]
    with pytest.raises(ProtocolError, match="unknown message kind"):
        p.unbatch(p.decode(frames, p.CLIENT_VERSION))
