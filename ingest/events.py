"""Catalog events: the records catalog owners write to the Kafka topic ``catalog.images``
(compacted; key = image id; JSON value). The one definition of the schema, used by the
consumer and by ``vsearch publish``.

upsert: {"schema": 1, "op": "upsert", "id": str, "uri": "file://..." | "http(s)://...",
         (or "image_b64": base64 of the image file), "metadata": {...} (optional, default {}),
         "visibility": "public" | "private" (optional, default "public"), "ts": epoch-ms}
delete: {"schema": 1, "op": "delete", "id": str, "ts": epoch-ms}

A record whose value is null (a Kafka tombstone) is a delete of its key at the record's
timestamp. For each id the event with the highest ``ts`` wins (ties: the later one in the
log); an event older than what is stored for its id is ignored. Anything else that is wrong
raises :class:`BadEvent` with the reason, and the consumer dead-letters the record.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time

SCHEMA = 1
TOPIC = "catalog.images"
OPS = ("upsert", "delete")
VISIBILITIES = ("public", "private")
URI_SCHEMES = ("file://", "http://", "https://")
MAX_ID_BYTES = 512
MAX_URI_BYTES = 4096
MAX_METADATA_BYTES = 65_536
MAX_INLINE_BYTES = 20 * 1024 * 1024
KNOWN_FIELDS = {"schema", "op", "id", "uri", "image_b64", "metadata", "visibility", "ts"}


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class BadEvent(ValueError):
    """A record that is not a valid catalog event; the message says why."""


@dataclasses.dataclass
class CatalogEvent:
    op: str
    id: str
    ts: int
    uri: str | None = None
    image: bytes | None = None          # decoded image_b64
    metadata: dict = dataclasses.field(default_factory=dict)
    visibility: str = "public"

    @property
    def stored_uri(self) -> str:
        """What the ``uri`` field in Milvus holds: the source URI, or ``inline:<id>``."""
        return self.uri if self.uri else f"inline:{self.id}"


def now_ms() -> int:
    return int(time.time() * 1000)


def upsert_event(id: str, *, uri: str | None = None, image: bytes | None = None,
                 metadata: dict | None = None, visibility: str = "public", ts: int | None = None) -> dict:
    """A valid upsert event (a dict; :func:`encode` it). Give ``uri`` or the image bytes."""
    ev = {"schema": SCHEMA, "op": "upsert", "id": id, "metadata": metadata or {},
          "visibility": visibility, "ts": now_ms() if ts is None else int(ts)}
    if (uri is None) == (image is None):
        raise ValueError("an upsert event needs exactly one of uri and image")
    if uri is not None:
        ev["uri"] = uri
    else:
        ev["image_b64"] = base64.b64encode(image).decode("ascii")
    validate(ev)
    return ev


def delete_event(id: str, ts: int | None = None) -> dict:
    ev = {"schema": SCHEMA, "op": "delete", "id": id, "ts": now_ms() if ts is None else int(ts)}
    validate(ev)
    return ev


def encode(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def encode_key(id: str) -> bytes:
    return id.encode()


def decode(key: bytes | None, value: bytes | None, record_ts: int | None = None) -> CatalogEvent:
    """The event in a Kafka record, validated; raises :class:`BadEvent` with the reason."""
    key_text = None
    if key is not None:
        try:
            key_text = key.decode()
        except UnicodeDecodeError as exc:
            raise BadEvent(f"record key is not UTF-8: {exc}") from exc
    if value is None:
        if not key_text:
            raise BadEvent("tombstone (null value) without a key: nothing to delete")
        _check_id(key_text)
        return CatalogEvent(op="delete", id=key_text, ts=int(record_ts or 0))
    try:
        raw = json.loads(value, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEvent(f"value is not JSON: {exc}") from exc
    event = validate(raw)
    if key_text is not None and key_text != event.id:
        raise BadEvent(f"record key {key_text[:80]!r} does not match the event id {event.id[:80]!r} "
                       "(the key must be the id, or compaction keeps the wrong record)")
    return event


def validate(raw) -> CatalogEvent:
    """A dict -> :class:`CatalogEvent`, or :class:`BadEvent` naming the first problem."""
    if not isinstance(raw, dict):
        raise BadEvent(f"event must be a JSON object, got {type(raw).__name__}")
    schema = raw.get("schema")
    if schema != SCHEMA or isinstance(schema, bool):
        raise BadEvent(f"unknown schema version {schema!r} (this consumer reads schema {SCHEMA})")
    op = raw.get("op")
    if op not in OPS:
        raise BadEvent(f"op must be one of {OPS}, got {op!r}")
    unknown = set(raw) - KNOWN_FIELDS
    if unknown:
        raise BadEvent(f"unknown field(s) {sorted(unknown)} in a schema {SCHEMA} event")
    if "id" not in raw:
        raise BadEvent("event without 'id'")
    _check_id(raw["id"])
    ts = raw.get("ts")
    if ts is None:
        raise BadEvent("event without 'ts' (epoch milliseconds)")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63:
        raise BadEvent(f"ts must be a non-negative integer of epoch milliseconds, got {ts!r}")
    if op == "delete":
        extra = [k for k in ("uri", "image_b64") if k in raw]
        if extra:
            raise BadEvent(f"a delete event carries no image, but has {extra}")
        return CatalogEvent(op="delete", id=raw["id"], ts=ts)

    has_uri, has_b64 = raw.get("uri") is not None, raw.get("image_b64") is not None
    if has_uri == has_b64:
        raise BadEvent("an upsert needs exactly one of 'uri' and 'image_b64'")
    uri, image = None, None
    if has_uri:
        uri = raw["uri"]
        if not isinstance(uri, str) or not uri.startswith(URI_SCHEMES):
            raise BadEvent(f"uri must be a string starting with one of {URI_SCHEMES}, got {str(uri)[:120]!r}")
        if len(uri.encode()) > MAX_URI_BYTES:
            raise BadEvent(f"uri longer than {MAX_URI_BYTES} bytes")
    else:
        b64 = raw["image_b64"]
        if not isinstance(b64, str) or not b64:
            raise BadEvent("image_b64 must be a non-empty base64 string")
        if len(b64) > MAX_INLINE_BYTES * 4 // 3 + 4:
            raise BadEvent(f"inline image larger than {MAX_INLINE_BYTES} bytes: use a uri")
        try:
            image = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadEvent(f"image_b64 is not valid base64: {exc}") from exc
    metadata = raw.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise BadEvent(f"metadata must be a JSON object, got {type(metadata).__name__}")
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise BadEvent(f"metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}")
    visibility = raw.get("visibility", "public")
    if visibility not in VISIBILITIES:
        raise BadEvent(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
    return CatalogEvent(op="upsert", id=raw["id"], ts=ts, uri=uri, image=image,
                        metadata=metadata, visibility=visibility)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_id(i) -> None:
    if not isinstance(i, str) or not i.strip():
        raise BadEvent(f"id must be a non-empty string, got {i!r}")
    if len(i.encode()) > MAX_ID_BYTES:
        raise BadEvent(f"id longer than {MAX_ID_BYTES} bytes")
    if "'" in i or "\\" in i:
        raise BadEvent(f"id {i[:80]!r} contains a quote or a backslash (not allowed in ids)")
