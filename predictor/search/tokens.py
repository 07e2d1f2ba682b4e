"""Signed search tokens: what a replica needs to log a click (or a deferred impression) on a
search that any replica answered, carried by the client instead of kept in a replica's memory.

A search answers with ``token``: its impression (query id, hashes, stored query image, crop,
model version, the results with ranks, scores and URIs, time), compressed and signed with
HMAC-SHA256 under the service's ``--click-secret``. ``POST /events`` sends it back with the
clicked ``item_id``; a replica with the same secret verifies it and completes the click record
from it, so a client can neither invent searches nor click results it was not shown.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import zlib

from ...core import search_events
from .errors import BadQuery

VERSION = b"v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """``sign(impression) -> token`` and ``verify(token) -> impression``; tokens expire after
    ``ttl_s`` seconds."""

    def __init__(self, secret: str | bytes | None, ttl_s: float = 86_400.0):
        if not secret:
            secret = secrets.token_bytes(32)        # clicks then work on this replica only
            self.shared = False
        else:
            self.shared = True
        self.key = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.ttl_s = ttl_s

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, VERSION + b"." + body, hashlib.sha256).digest()

    def sign(self, impression: dict) -> str:
        body = zlib.compress(search_events.encode(impression), 6)
        return f"{VERSION.decode()}.{_b64(body)}.{_b64(self._mac(body))}"

    def verify(self, token) -> dict:
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 200_000:
            raise BadQuery("token must be the 'token' of a search this service answered")
        version, body_text, mac_text = token.split(".")
        try:
            body, mac = _unb64(body_text), _unb64(mac_text)
        except (binascii.Error, ValueError) as exc:
            raise BadQuery("token is not valid base64") from exc
        if version.encode() != VERSION or not hmac.compare_digest(mac, self._mac(body)):
            raise BadQuery("token was not issued by this service (or was altered)")
        try:
            impression = json.loads(zlib.decompress(body, bufsize=65_536))
        except (zlib.error, ValueError) as exc:
            raise BadQuery("token holds no search") from exc
        age = time.time() - impression.get("ts", 0) / 1000
        if age > self.ttl_s:
            raise BadQuery(f"token expired ({age / 3600:.1f} h old; tokens last {self.ttl_s / 3600:.1f} h)")
        return impression
