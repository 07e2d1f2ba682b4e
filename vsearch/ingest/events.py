"""Catalog events: the records catalog owners write to the Kafka topic ``catalog.images``
(compacted; key = image id; JSON value). The one definition of the schema (a pydantic model),
used by the consumer and by ``vsearch publish``.

upsert: {"schema": 1, "op": "upsert", "id": str, "uri": "file://..." | "http(s)://...",
         (or "image_b64": base64 of the image file), "metadata": {...} (optional, default {}),
         "visibility": "public" | "private" (optional, default "public"), "ts": epoch-ms}
delete: {"schema": 1, "op": "delete", "id": str, "ts": epoch-ms}

A record whose value is null (a Kafka tombstone) is a delete of its key at the record's
timestamp. For each id the event with the highest ``ts`` wins (ties: the later one in the
log); an event older than what is stored for its id is ignored. Anything else that is wrong
raises :class:`BadEvent` with the reason, and the consumer dead-letters the record. Ids and
metadata are held to the limits of the Milvus store (:mod:`vsearch.core.rows`).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ..core.fetch import FetchError, check_uri_text
from ..core.images import DEFAULT_MAX_BYTES
from ..core.rows import MAX_URI_BYTES, VISIBILITIES, check_id, check_metadata
from ..core.text import brief

SCHEMA = 1
TOPIC = "catalog.images"
OPS = ("upsert", "delete")
URI_SCHEMES = ("file://", "http://", "https://")
MAX_INLINE_BYTES = DEFAULT_MAX_BYTES


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class BadEvent(ValueError):
    """A record that is not a valid catalog event; the message says why."""


def _check_uri(uri: str) -> str:
    if not uri.startswith(URI_SCHEMES):
        raise ValueError(f"uri must be a string starting with one of {URI_SCHEMES}, got {uri[:120]!r}")
    try:
        check_uri_text(uri)                 # no control characters, spaces or lone surrogates
    except FetchError as exc:
        raise ValueError(f"uri {uri[:80]!r}: {exc}") from None
    if len(uri.encode()) > MAX_URI_BYTES:
        raise ValueError(f"uri longer than {MAX_URI_BYTES} bytes")
    return uri


def _check_b64(text: str) -> str:
    if not text:
        raise ValueError("image_b64 must be a non-empty base64 string")
    if len(text) > MAX_INLINE_BYTES * 4 // 3 + 4:
        raise ValueError(f"inline image larger than {MAX_INLINE_BYTES} bytes: use a uri")
    return text


class CatalogEvent(BaseModel):
    """One validated catalog event (``image`` holds the decoded ``image_b64``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, frozen=True)

    schema_version: Literal[1] = Field(alias="schema")
    op: Literal["upsert", "delete"]
    id: Annotated[str, AfterValidator(check_id)]
    ts: Annotated[int, Field(ge=0, lt=2**63)]
    uri: Annotated[str, AfterValidator(_check_uri)] | None = None
    image_b64: Annotated[str, AfterValidator(_check_b64)] | None = None
    metadata: dict = Field(default_factory=dict)      # checked by validate() first (check_metadata)
    visibility: Literal["public", "private"] = "public"
    _image: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_source(self) -> "CatalogEvent":
        if self.op == "delete":
            extra = [k for k in ("uri", "image_b64") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"a delete event carries no image, but has {extra}")
            return self
        if (self.uri is None) == (self.image_b64 is None):
            raise ValueError("an upsert needs exactly one of 'uri' and 'image_b64'")
        if self.image_b64 is not None:
            try:
                self._image = base64.b64decode(self.image_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"image_b64 is not valid base64: {exc}") from exc
        return self

    @property
    def image(self) -> bytes | None:
        return self._image

    @property
    def stored_uri(self) -> str:
        """What the ``uri`` field in Milvus holds: the source URI, or ``inline:<id>``."""
        return self.uri if self.uri else f"inline:{self.id}"


def _reason(err: ValidationError) -> str:
    """The first problem of a validation error, in words a catalog owner can act on."""
    errors = sorted(err.errors(), key=lambda e: (e["loc"][:1] != ("schema",), e["loc"][:1] != ("op",)))
    e = errors[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "missing":
        return f"event without {loc!r}"
    if e["type"] == "extra_forbidden":
        unknown = sorted(".".join(str(p) for p in x["loc"]) for x in errors if x["type"] == "extra_forbidden")
        return f"unknown field(s) {unknown} in a schema {SCHEMA} event"
    if loc == "schema":
        return f"unknown schema version {brief(e.get('input'))} (this consumer reads schema {SCHEMA})"
    if loc == "op":
        return f"op must be one of {OPS}, got {brief(e.get('input'))}"
    if loc == "visibility":
        return f"visibility must be one of {VISIBILITIES}, got {brief(e.get('input'))}"
    if loc == "ts":
        return f"ts must be a non-negative integer of epoch milliseconds, got {brief(e.get('input'))}"
    if loc == "metadata" and e["type"] == "dict_type":
        return f"metadata must be a JSON object, got {type(e.get('input')).__name__}"
    msg = e["msg"].removeprefix("Value error, ")
    return msg if not loc or msg.startswith(loc) else f"{loc}: {msg}"


def validate(raw) -> CatalogEvent:
    """A dict -> :class:`CatalogEvent`, or :class:`BadEvent` naming the first problem."""
    if not isinstance(raw, dict):
        raise BadEvent(f"event must be a JSON object, got {type(raw).__name__}")
    if "schema" not in raw:
        raise BadEvent(f"unknown schema version None (this consumer reads schema {SCHEMA})")
    meta = raw.get("metadata")
    if isinstance(meta, dict):
        try:
            check_metadata(meta)            # first, iteratively: any depth gets its reason
        except ValueError as exc:
            raise BadEvent(str(exc)) from None
    try:
        return CatalogEvent.model_validate(raw)
    except ValidationError as exc:
        raise BadEvent(_reason(exc)) from None
    except RecursionError:
        raise BadEvent("event nests too deeply") from None


def now_ms() -> int:
    return int(time.time() * 1000)


def upsert_event(id: str, *, uri: str | None = None, image: bytes | None = None,
                 metadata: dict | None = None, visibility: str = "public", ts: int | None = None) -> dict:
    """A valid upsert event (a dict; :func:`encode` it). Give ``uri`` or the image bytes."""
    if (uri is None) == (image is None):
        raise ValueError("an upsert event needs exactly one of uri and image")
    ev = {"schema": SCHEMA, "op": "upsert", "id": id, "metadata": metadata or {},
          "visibility": visibility, "ts": now_ms() if ts is None else int(ts)}
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
        return validate({"schema": SCHEMA, "op": "delete", "id": key_text, "ts": int(record_ts or 0)})
    try:
        raw = json.loads(value, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEvent(f"value is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadEvent("value is not usable JSON: nested too deeply") from None
    event = validate(raw)
    if key_text is not None and key_text != event.id:
        raise BadEvent(f"record key {key_text[:80]!r} does not match the event id {event.id[:80]!r} "
                       "(the key must be the id, or compaction keeps the wrong record)")
    return event


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
