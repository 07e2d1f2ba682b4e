"""Re-ranking the candidates Milvus returned: most similar first, never a private item, one
of each group of near-duplicates, at most k."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Candidate:
    id: str
    score: float
    uri: str | None = None
    metadata: dict = field(default_factory=dict)
    visibility: str = "public"
    content_hash: str | None = None
    vector: np.ndarray | None = None

    def result(self) -> dict:
        """What a client sees: the catalog's own ``uri`` stays inside (it may name a bucket, a
        host or a path); ``uri`` is where this service serves the image (``GET /images/<id>``)."""
        return {"id": self.id, "score": round(float(self.score), 6), "uri": image_path(self.id),
                "metadata": self.metadata}


def image_path(item_id: str) -> str:
    """The path of an item's image on the search service (relative to its base URL)."""
    return "/images/" + urllib.parse.quote(str(item_id), safe="")


def rerank(candidates: Sequence[Candidate], k: int, dedup_distance: float) -> list[Candidate]:
    """Most similar first; never a private item; of any group of near-duplicates (same content
    hash, or embeddings within ``dedup_distance`` cosine distance of a better result) only the
    best stays. The order is otherwise kept; at most ``k`` come back."""
    if k <= 0:
        return []
    ordered = sorted(candidates, key=lambda c: -c.score)      # stable: ties keep Milvus' order
    kept: list[Candidate] = []
    kept_vectors: list[np.ndarray] = []
    hashes: set[str] = set()
    for cand in ordered:
        if cand.visibility == "private":
            continue
        if cand.content_hash and cand.content_hash in hashes:
            continue
        if dedup_distance > 0 and cand.vector is not None and kept_vectors:
            sims = np.stack(kept_vectors) @ np.asarray(cand.vector, dtype=np.float32)
            if float(1.0 - sims.max()) <= dedup_distance:
                continue
        kept.append(cand)
        if cand.content_hash:
            hashes.add(cand.content_hash)
        if cand.vector is not None:
            v = np.asarray(cand.vector, dtype=np.float32)
            kept_vectors.append(v / max(float(np.linalg.norm(v)), 1e-12))
        if len(kept) == k:
            break
    return kept
