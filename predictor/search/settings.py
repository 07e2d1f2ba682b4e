"""The search service's settings (the flags of ``vsearch serve search``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class SearchSettings:
    alias: str = "images"
    k_default: int = 20
    k_max: int = 100
    overfetch: float = 3.0            # candidates fetched per wanted result (re-ranking drops some)
    max_candidates: int = 2000        # most candidates asked of Milvus for one query
    dedup_distance: float = 0.02      # cosine distance under which two results are duplicates
    filter_fields: tuple[str, ...] = ("label", "category", "source", "group")
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    milvus_timeout: float = 10.0
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
    # Embedder URLs a collection's model record may send queries to (shell patterns), besides
    # --embedder-url: the record is written by whoever created the collection, so not trusted.
    allowed_embedder_urls: tuple[str, ...] = ()
