"""Search tokens: what a replica needs to log a click (or a deferred impression) on a search
that any replica answered, carried by the client instead of kept in a replica's memory.

A search answers with ``token``: :mod:`itsdangerous` ``URLSafeTimedSerializer`` output
(compressed JSON, a timestamp, HMAC-SHA256 under the service's ``--click-secret``, salt
``vsearch.search-token.v2``), expiring after ``--click-token-ttl`` seconds. Signed, not
encrypted: a client can read it, so it holds only what the answer already told the client
(query id, the results' ids, ranks and scores, model version, collection, crop, k, time, the
query's hashes; during an experiment its arm and the teams of interleaved results, which
the answer does not show) and ``query_ref``, the query image's name inside the query store (its content
hash and date, never the store's folder, bucket or prefix), from which the server derives the
stored image's URI. Catalog URIs are never in it: a click's ``item_uri`` is read from the
catalog when the click is logged. ``POST /events`` sends the token back with the clicked
``item_id``; a replica with the same secret verifies it, so a client can neither invent
searches nor click results it was not shown.
"""

from __future__ import annotations

import hashlib
import secrets

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from .errors import BadQuery

SALT = "vsearch.search-token.v2"
MAX_TOKEN_CHARS = 200_000
# What a token may hold (the impression's other fields stay on the server).
TOKEN_FIELDS = ("query_id", "query_hash", "image_hash", "query_ref", "crop", "model_version", "collection",
                "results", "k", "took_ms", "ts")
RESULT_FIELDS = ("id", "rank", "score")


def public_impression(impression: dict) -> dict:
    """The part of an impression a token carries (see the module); during an online experiment
    also its ``experiment`` object (id, design, arm, the unit's salted hash) and each
    interleaved result's ``team``, so that the click any replica logs credits the right arm."""
    out = {k: impression.get(k) for k in TOKEN_FIELDS}
    out["results"] = [{**{k: r.get(k) for k in RESULT_FIELDS}, **({"team": r["team"]} if r.get("team") else {})}
                      for r in impression.get("results") or ()]
    if impression.get("experiment"):
        out["experiment"] = impression["experiment"]
    return out


class TokenSigner:
    """``sign(impression) -> token`` and ``verify(token) -> the token's impression``; tokens
    expire after ``ttl_s`` seconds."""

    def __init__(self, secret: str | bytes | None, ttl_s: float = 86_400.0):
        self.shared = bool(secret)
        if not secret:
            secret = secrets.token_bytes(32)        # clicks then work on this replica only
        self.ttl_s = ttl_s
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT,
                                                  signer_kwargs={"digest_method": hashlib.sha256})

    def sign(self, impression: dict) -> str:
        return self._serializer.dumps(public_impression(impression))

    def verify(self, token) -> dict:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise BadQuery("token must be the 'token' of a search this service answered")
        try:
            impression = self._serializer.loads(token, max_age=self.ttl_s)
        except SignatureExpired as exc:
            raise BadQuery(f"token expired (tokens last {self.ttl_s / 3600:.1f} h)") from exc
        except BadSignature as exc:
            raise BadQuery("token was not issued by this service (or was altered)") from exc
        if not isinstance(impression, dict) or not isinstance(impression.get("results"), list):
            raise BadQuery("token holds no search")
        return impression
