"""Query images kept by content hash, so that search events' ``query_uri`` points at a real
object the trainer reads (query image, clicked image) pairs from.

Where, chosen by ``--query-store``:

- a folder (or ``file://`` URI): one replica, or a volume every replica and the trainer mount;
  bounded by ``--query-store-max-mb``: past it the oldest images go first;
- ``s3://bucket/prefix``: any number of replicas; keys are ``prefix/YYYY/MM/DD/<hash><suffix>``,
  so a bucket lifecycle rule on the date prefixes is the retention (the chart documents one);
- empty: not kept (events carry no ``query_uri``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from ...core.images import web_media_type
from ...core.objects import s3_client, split_s3
from ..preprocess import Box

log = logging.getLogger(__name__)


def _suffix(kind: tuple[str, str] | None) -> str:
    """The file suffix of a ``web_media_type`` answer."""
    return kind[1] if kind else ".img"           # what the trainer and /images can read by name


class QueryStore:
    """``put(data, digest) -> uri or None``; never fails a search (failures are logged)."""

    def __init__(self, location: str | os.PathLike | None, *, max_bytes: int = 1024 * 1024 * 1024):
        location = str(location or "")
        self.s3: tuple[str, str] | None = None
        self.root: Path | None = None
        if location.startswith("s3://"):
            bucket, prefix = split_s3(location)
            self.s3 = (bucket, prefix.strip("/"))
        elif location:
            self.root = Path(urllib.parse.urlsplit(location).path if location.startswith("file://") else location)
            self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root else 0

    @property
    def enabled(self) -> bool:
        return bool(self.root or self.s3)

    def put(self, data: bytes, digest: str) -> str | None:
        if self.s3:
            return self._put_s3(data, digest)
        if self.root:
            return self._put_file(data, digest)
        return None

    def ref_of(self, uri: str | None) -> str | None:
        """A stored image's name inside the store (below its folder, or its bucket and prefix):
        what a search token carries instead of the URI. A ``catalog:<id>`` query keeps its URI."""
        if not uri:
            return None
        if uri.startswith("catalog:"):
            return uri
        if self.s3:
            base = f"s3://{self.s3[0]}/" + (f"{self.s3[1]}/" if self.s3[1] else "")
            return uri[len(base):] if uri.startswith(base) else None
        if self.root:
            base = self.root.resolve().as_uri() + "/"
            return urllib.parse.unquote(uri[len(base):]) if uri.startswith(base) else None
        return None

    def uri_of(self, ref: str | None) -> str | None:
        """The URI of a stored image from its :meth:`ref_of` name (None when the store is off
        or the name is not one of its names)."""
        if not ref or not isinstance(ref, str):
            return None
        if ref.startswith("catalog:"):
            return ref
        parts = ref.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in ref:
            return None
        if self.s3:
            return "/".join(["s3:/", self.s3[0], *([self.s3[1]] if self.s3[1] else []), ref])
        if self.root:
            return (self.root.resolve() / ref).as_uri()
        return None

    def _put_s3(self, data: bytes, digest: str) -> str | None:
        bucket, prefix = self.s3
        kind = web_media_type(data)
        key = "/".join(p for p in (prefix, time.strftime("%Y/%m/%d", time.gmtime()), digest + _suffix(kind)) if p)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data,
                                   ContentType=kind[0] if kind else "application/octet-stream")
        except (BotoCoreError, ClientError) as exc:
            log.error("could not store query image s3://%s/%s: %s", bucket, key, exc)
            return None
        return f"s3://{bucket}/{key}"

    def _put_file(self, data: bytes, digest: str) -> str | None:
        path = self.root / digest[:2] / f"{digest}{_suffix(web_media_type(data))}"
        if path.exists():
            return path.resolve().as_uri()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as exc:
            log.error("could not store query image %s: %s", path, exc)
            return None
        with self._lock:
            self._size += len(data)
            if self._size > self.max_bytes:
                self._evict(keep=path)
        return path.resolve().as_uri()

    def _evict(self, keep: Path) -> None:
        """Delete the oldest images until the store holds at most 90% of its quota."""
        files = sorted((p for p in self.root.rglob("*") if p.is_file() and p != keep),
                       key=lambda p: p.stat().st_mtime)
        target = int(self.max_bytes * 0.9)
        for p in files:
            if self._size <= target:
                break
            try:
                size = p.stat().st_size
                p.unlink()
                self._size -= size
            except OSError:
                continue
        log.info("query store over its quota of %d bytes: oldest images removed, %d bytes kept",
                 self.max_bytes, self._size)


def query_hashes(image: bytes, crop: Box | None) -> tuple[str, str]:
    """(hash of the image bytes, hash of the query = bytes + crop)."""
    h = hashlib.sha256(image)
    image_hash = h.hexdigest()
    if crop is None:
        return image_hash, image_hash
    h.update(b"|crop=" + ",".join(f"{v:.6f}" for v in crop).encode())     # = sha256(image + crop part)
    return image_hash, h.hexdigest()
