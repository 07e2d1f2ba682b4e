"""Catalog event schema: what is accepted and the reasons given for what is not."""

from __future__ import annotations

import base64
import json

import pytest

from vsearch.ingest.events import BadEvent, decode, delete_event, encode, upsert_event, validate


def value(**kw):
    ev = {"schema": 1, "op": "upsert", "id": "a1", "uri": "file:///x.jpg", "metadata": {"k": 1},
          "visibility": "public", "ts": 5}
    ev.update(kw)
    return json.dumps({k: v for k, v in ev.items() if v is not ...}).encode()


def test_valid_upserts_and_deletes_round_trip():
    ev = decode(b"a1", value())
    assert (ev.op, ev.id, ev.uri, ev.metadata, ev.visibility, ev.ts) == (
        "upsert", "a1", "file:///x.jpg", {"k": 1}, "public", 5)
    inline = upsert_event("b", image=b"\xff\xd8bytes", ts=7, visibility="private")
    ev = decode(b"b", encode(inline))
    assert ev.image == b"\xff\xd8bytes" and ev.uri is None and ev.stored_uri == "inline:b"
    assert ev.visibility == "private" and ev.metadata == {}
    d = decode(b"c", encode(delete_event("c", ts=9)))
    assert (d.op, d.id, d.ts) == ("delete", "c", 9)
    # defaults: no metadata, no visibility
    ev = decode(None, value(metadata=..., visibility=...))
    assert ev.metadata == {} and ev.visibility == "public"


def test_kafka_tombstone_is_a_delete_of_the_key():
    ev = decode(b"gone", None, record_ts=1234)
    assert (ev.op, ev.id, ev.ts) == ("delete", "gone", 1234)
    with pytest.raises(BadEvent, match="without a key"):
        decode(None, None)


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (value(schema=2), "unknown schema version 2"),
    (value(schema=...), "unknown schema version None"),
    (value(op="replace"), "op must be one of"),
    (value(id=...), "without 'id'"),
    (value(id=""), "non-empty string"),
    (value(id="it's"), "quote"),
    (value(ts=...), "without 'ts'"),
    (value(ts="yesterday"), "epoch milliseconds"),
    (value(ts=-1), "epoch milliseconds"),
    (value(uri="ftp://host/x.jpg"), "uri must be a string starting with"),
    (value(uri=..., image_b64=None), "exactly one of"),
    (value(image_b64="aGVsbG8="), "exactly one of"),
    (value(uri=..., image_b64="not base64!!"), "not valid base64"),
    (value(metadata=[1, 2]), "metadata must be a JSON object"),
    (value(metadata={"x": "y" * 70_000}), "limit"),
    (value(visibility="hidden"), "visibility must be one of"),
    (value(colour="red"), "unknown field"),
    (b'{"schema": 1, "op": "upsert", "id": "a1", "uri": "file:///x", "ts": 1, "metadata": {"x": NaN}}',
     "not JSON"),
    (json.dumps({"schema": 1, "op": "delete", "id": "a1", "ts": 1, "uri": "file:///x"}).encode(),
     "carries no image"),
])
def test_bad_events_are_refused_with_a_reason(raw, reason):
    with pytest.raises(BadEvent, match=reason):
        decode(b"a1", raw)


def test_key_must_match_id():
    with pytest.raises(BadEvent, match="does not match"):
        decode(b"other", value())


def test_helpers_validate_what_they_build():
    with pytest.raises(ValueError, match="exactly one"):
        upsert_event("x")
    with pytest.raises(BadEvent):
        upsert_event("x", uri="s3://bucket/x.jpg")
    ev = validate({"schema": 1, "op": "upsert", "id": "z", "ts": 1,
                   "image_b64": base64.b64encode(b"abc").decode()})
    assert ev.image == b"abc"
