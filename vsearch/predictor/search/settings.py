"""The search service's settings: the one home of every default of ``vsearch serve search``
(its flags take their defaults from :class:`SearchSettings`, see ``cli.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ...core.naming import DEFAULT_ALIAS

# Where the command keeps query images when nothing else is given (the library's default is
# None: a SearchService built in code writes nothing unless told where).
DEFAULT_QUERY_STORE = ".vsearch/queries"


@dataclass
class SearchSettings:
    alias: str = DEFAULT_ALIAS
    k_default: int = 20
    k_max: int = 100
    overfetch: float = 3.0            # candidates fetched per wanted result (re-ranking drops some)
    max_candidates: int = 2000        # most candidates asked of Milvus for one query
    dedup_distance: float = 0.02      # cosine distance under which two results are duplicates
    filter_fields: tuple[str, ...] = ("label", "category", "source", "group")
    max_upload_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    query_store: str | None = None    # where query images are kept: a folder or s3://bucket/prefix
    query_store_max_bytes: int = 1024 * 1024 * 1024   # quota of a folder store
    allow_url_queries: bool = False
    allow_private_urls: bool = False
    url_timeout: float = 5.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    image_roots: tuple[Path, ...] = ()   # file:// catalog images served only from these (empty: none)
    allow_private_image_urls: bool = False   # http(s) catalog images proxied from any address
    click_secret: str | None = None       # signs search tokens; the same on every replica
    click_token_ttl_s: float = 86_400.0   # how long a search's token can log clicks
    model_version: str | None = None      # override of the reported model version
    # the web page says "nothing close" when the best score is under this (cosine similarity;
    # depends on the model: a trained one puts related images well above it)
    weak_match_score: float = 0.3
    # Embedder URLs a collection's model record may send queries to (shell patterns), besides
    # --embedder-url: the record is written by whoever created the collection, so not trusted.
    allowed_embedder_urls: tuple[str, ...] = ()
    # Threads that run searches (each waits on the embedder and on Milvus in turn): concurrent
    # searches beyond it queue. 0: asyncio's default pool (min(32, CPUs + 4) threads).
    threads: int = 32
    # In-process embedding: concurrent queries share one forward pass of up to this many
    # images (:class:`~vsearch.predictor.coalesce.CoalescingEmbedder`); 1: one pass per query.
    embed_batch: int = 16
