"""Names of what the platform keeps in Milvus, read by the store, the ingest command, the
operator, the search service and the demo: the collection of a model version, its tombstones,
the serving alias, and the model id that search answers and events carry."""

from __future__ import annotations

import re

DEFAULT_ALIAS = "images"
COLLECTION_PREFIX = "images"
TOMBSTONE_SUFFIX = "__tombstones"


def sanitise(text: str) -> str:
    """Letters, digits and underscores, starting with a letter (Milvus naming rules)."""
    s = re.sub(r"[^0-9a-zA-Z_]", "_", str(text)).lower()
    return s if s[:1].isalpha() else "m_" + s


def collection_name(model_name: str, version: str | int, prefix: str = COLLECTION_PREFIX) -> str:
    """``images__<model>__<version>``, sanitised: ``("ResNet-18", "1.2")`` -> ``images__resnet_18__1_2``."""
    if not str(model_name).strip() or not str(version).strip():
        raise ValueError("collection_name needs a non-empty model name and version")
    name = f"{prefix}__{sanitise(model_name)}__{re.sub(r'[^0-9a-zA-Z_]', '_', str(version)).lower()}"
    if len(name) > 255 - len(TOMBSTONE_SUFFIX):
        raise ValueError(f"collection name too long ({len(name)} chars): {name[:80]}...")
    return name


def model_id(model: str, version: str) -> str:
    """``name__version`` sanitised: the model version named in search answers and events."""
    return sanitise(f"{model}__{version}")
