"""Query images kept by content hash, so that search events' ``query_uri`` points at a real
file the trainer reads (query image, clicked image) pairs from."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

from ...core.images import web_media_type
from ..preprocess import Box

log = logging.getLogger(__name__)


class QueryStore:
    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, digest: str) -> str | None:
        """Keep ``data`` (once per digest); returns its ``file://`` URI, or None when off."""
        if not self.root:
            return None
        kind = web_media_type(data)
        path = self.root / digest[:2] / f"{digest}{kind[1] if kind else '.img'}"
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(path.suffix + f".{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            except OSError as exc:
                log.error("could not store query image %s: %s", path, exc)
                return None
        return path.resolve().as_uri()


def query_hashes(image: bytes, crop: Box | None) -> tuple[str, str]:
    """(hash of the image bytes, hash of the query = bytes + crop)."""
    image_hash = hashlib.sha256(image).hexdigest()
    if crop is None:
        return image_hash, image_hash
    box = ",".join(f"{v:.6f}" for v in crop)
    return image_hash, hashlib.sha256(image + b"|crop=" + box.encode()).hexdigest()
