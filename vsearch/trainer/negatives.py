"""Hard negatives for click-pair training, mined from the current index.

For each query image of the pairs, the model that built the index embeds it, Milvus returns
its nearest catalog items (:class:`vsearch.core.store.MilvusStore`), and the closest ones that were
*not* clicked for that query (and are not the query itself) become its hard negatives: images
the current model confuses with the right answer.

    vsearch train --data pairs.csv --init models/default --out runs/clicks \\
        --hard-negatives-from /data/vsearch.db --hard-negatives-collection images
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.store import DEFAULT_ALIAS
from ..predictor.preprocess import InvalidImage
from .data import DataError, read_source, split_crop

log = logging.getLogger(__name__)


def canonical(source: str) -> str:
    """Paths and ``file://`` URIs of one file compare equal."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path)).resolve().as_uri()
    if parsed.scheme and len(parsed.scheme) > 1:
        return source
    return Path(source).resolve().as_uri()


def mine_hard_negatives(pairs: Sequence[tuple[str, str]], embedder, store, collection: str = DEFAULT_ALIAS,
                        k: int = 10, per_query: int = 2, batch_size: int = 32
                        ) -> tuple[dict[str, list[str]], dict]:
    """{query source: [uri of a hard negative, ...]} and counts of what happened.

    ``embedder`` has ``embed_bytes`` (an :class:`~vsearch.predictor.inference.Embedder` or the HTTP client);
    ``store`` is a :class:`~vsearch.core.store.MilvusStore`; ``collection`` a collection or alias."""
    clicked: dict[str, set[str]] = {}
    for q, c in pairs:
        clicked.setdefault(q, set()).add(canonical(c))
    queries = list(clicked)
    stats = {"queries": len(queries), "queries_unreadable": 0, "queries_with_negatives": 0,
             "negatives": 0}
    readable, blobs, crops = [], [], []
    for q in queries:
        src, crop = split_crop(q)
        try:
            blobs.append(read_source(src))
            crops.append(crop)
            readable.append(q)
        except (OSError, DataError) as exc:
            stats["queries_unreadable"] += 1
            log.warning("hard negatives: cannot read query %s: %s", q, exc)
    out: dict[str, list[str]] = {}
    for start in range(0, len(readable), batch_size):
        chunk, chunk_blobs = readable[start:start + batch_size], blobs[start:start + batch_size]
        chunk_crops = crops[start:start + batch_size]
        try:
            vectors = embedder.embed_bytes(chunk_blobs, chunk_crops)
        except InvalidImage:
            vectors = []
            for b, c in zip(chunk_blobs, chunk_crops):          # find the bad one; keep the rest
                try:
                    vectors.append(embedder.embed_bytes([b], [c])[0])
                except InvalidImage:
                    vectors.append(None)
        keep = [i for i, v in enumerate(vectors) if v is not None]
        stats["queries_unreadable"] += len(chunk) - len(keep)
        if not keep:
            continue
        hits = store.search(collection, np.stack([vectors[i] for i in keep]), k=k, output_fields=("uri",))
        for i, row in zip(keep, hits):
            q = chunk[i]
            own = canonical(split_crop(q)[0])
            negs = [h["uri"] for h in row
                    if h.get("uri") and canonical(h["uri"]) not in clicked[q] and canonical(h["uri"]) != own]
            if negs:
                out[q] = negs[:per_query]
                stats["queries_with_negatives"] += 1
                stats["negatives"] += len(out[q])
    return out, stats
