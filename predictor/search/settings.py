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
    query_store: Path | None = None   # where query images are kept (by content hash)
    allow_url_queries: bool = False
    allow_private_urls: bool = False
    url_timeout: float = 5.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    image_roots: tuple[Path, ...] = ()   # file:// catalog images served only from these (empty: none)
    allow_private_image_urls: bool = False   # http(s) catalog images proxied from any address
    recent_queries: int = 10_000          # query ids remembered for clicks
    model_version: str | None = None      # override of the reported model version
