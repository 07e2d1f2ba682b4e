"""Fuzzing of what reads untrusted input: the catalog event validator, the image decoder, the
binary tensor extension parser, the filter builder and the fetcher's URI checks. Each may only
answer with its own error kind (or a value), never crash with another exception. Fast by
default; ``VSEARCH_FUZZ_EXAMPLES=20000`` runs them long."""

from __future__ import annotations

import io
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve.errors import InvalidInput
from PIL import Image

from vsearch.core.fetch import FetchConfig, Fetcher, FetchError
from vsearch.core.rows import check_id, check_metadata
from vsearch.core.store import filter_expr
from vsearch.ingest.events import BadEvent, CatalogEvent, decode
from vsearch.predictor.preprocess import InvalidImage, Limits, PreprocessConfig, bytes_to_array
from vsearch.predictor.protocol import binary_request_to_json
from vsearch.predictor.search.errors import BadQuery
from vsearch.predictor.search.request import parse_filter

EXAMPLES = int(os.environ.get("VSEARCH_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=30)
event_like = st.fixed_dictionaries(
    {"schema": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={"op": st.sampled_from(["upsert", "delete", "purge", 1]),
              "id": st.text(max_size=30) | st.integers(), "ts": st.integers(-5, 2**64) | st.text(max_size=3),
              "uri": st.text(max_size=40) | st.sampled_from(["file:///a.jpg", "http://x/y.jpg", "https://[::1/"]),
              "image_b64": st.text(max_size=40), "metadata": json_values,
              "visibility": st.sampled_from(["public", "private", "x"]), "extra": json_values})


@fuzz
@given(key=st.none() | st.binary(max_size=40), value=st.none() | st.binary(max_size=200) | event_like.map(
    lambda e: json.dumps(e).encode()), ts=st.none() | st.integers(0, 2**63 - 1))
def test_event_decoder_only_raises_bad_event(key, value, ts):
    try:
        ev = decode(key, value, ts)
    except BadEvent:
        return
    assert isinstance(ev, CatalogEvent)
    check_id(ev.id)                              # what the validator accepts the store accepts
    check_metadata(ev.metadata)
    json.dumps(ev.metadata, ensure_ascii=False).encode()


@fuzz
@given(text=st.text(max_size=60))
def test_event_decoder_on_json_text_with_escapes(text):
    raw = ('{"schema":1,"op":"upsert","id":%s,"uri":%s,"metadata":{"k":%s},"ts":1}'
           % (json.dumps(text), json.dumps("file:///" + text), json.dumps(text))).encode()
    try:
        decode(None, raw)
    except BadEvent:
        pass


def _samples() -> list[bytes]:
    img = Image.new("RGB", (24, 16), (10, 200, 30))
    out = []
    for fmt, kw in (("JPEG", {"exif": _exif()}), ("PNG", {}), ("GIF", {}), ("TIFF", {}), ("WEBP", {}), ("BMP", {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    Image.new("I;16", (20, 10)).save(buf, "PNG")
    out.append(buf.getvalue())
    return out


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "maker"
    return exif.tobytes()


SAMPLES = None


@fuzz
@given(which=st.integers(0, 6), edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=12),
       cut=st.none() | st.integers(1, 4000))
def test_image_decoder_only_raises_invalid_image(which, edits, cut):
    global SAMPLES
    SAMPLES = SAMPLES or _samples()
    data = bytearray(SAMPLES[which])
    for pos, byte in edits:
        data[pos % len(data)] = byte
    if cut:
        data = data[:cut]
    try:
        arr = bytes_to_array(bytes(data), PreprocessConfig(image_size=16, resize_size=18), (0.1, 0.1, 0.9, 0.9),
                             Limits(max_pixels=1_000_000))
        assert arr.shape == (3, 16, 16)
    except InvalidImage:
        pass


@fuzz
@given(head=event_like.map(lambda e: {"inputs": [e]}) | st.fixed_dictionaries({"inputs": st.lists(
    st.fixed_dictionaries({"name": st.text(max_size=5), "datatype": st.sampled_from(
        ["BYTES", "FP32", "INT64", "BOOL", "FP16", "X"]), "shape": st.lists(st.integers(-1, 5), max_size=3),
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-2, 64) | st.text(max_size=2)})}),
    max_size=3)}), tail=st.binary(max_size=64), length=st.integers(-3, 400) | st.text(max_size=4))
def test_binary_extension_parser_only_raises_invalid_input(head, tail, length):
    body = json.dumps(head).encode() + tail
    try:
        out = binary_request_to_json(body, length if length != 0 else len(body) - len(tail))
        json.dumps(out)
    except InvalidInput:
        pass


@fuzz
@given(value=json_values)
def test_filters_parse_to_400s_or_expressions(value):
    try:
        spec = parse_filter({"label": value} if not isinstance(value, dict) else value, ("label", "x"))
    except BadQuery:
        return
    expr = filter_expr(spec)
    expr.encode("utf-8")                         # sendable


@fuzz
@given(rest=st.text(max_size=60), scheme=st.sampled_from(["http://", "https://", "file://", "HTTP://", "ftp://", ""]))
def test_fetcher_only_raises_fetch_error_and_connects_nowhere(rest, scheme, monkeypatch_session):
    f = Fetcher(FetchConfig(file_roots=(), retries=0, total_timeout=1))
    try:
        f.fetch(scheme + rest)
    except FetchError:
        pass
    finally:
        f.close()


class _NoNetwork(Exception):
    pass


@pytest.fixture(scope="module")
def monkeypatch_session():
    """No name is resolved and no connection made: the fuzzed URIs stop before any network."""
    mp = pytest.MonkeyPatch()

    def no_dns(*_a, **_k):
        raise socket.gaierror("no DNS in the fuzz test")

    def no_pool(*_a, **_k):
        raise FetchError("would connect (not in the fuzz test)")

    mp.setattr(socket, "getaddrinfo", no_dns)
    mp.setattr(Fetcher, "_pool_for", no_pool)
    yield
    mp.undo()
