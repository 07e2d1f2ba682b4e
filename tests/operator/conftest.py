"""Fixtures of the operator tests: two real model directories of different embedding sizes, a
small catalog of real photos on the session broker, and the stand-in cluster."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.operator.cluster import Cluster
from vsearch.local.samples import TINY, caltech_photos, generated_photos


@pytest.fixture(scope="session")
def rollout_models(tmp_path_factory) -> dict[str, Path]:
    """v1: a tiny ResNet (16-d); v2: a tiny ViT (32-d): a switch between them would fail loudly
    if any query mixed them."""
    from vsearch.predictor.model import init_model_dir
    root = tmp_path_factory.mktemp("rollout-models")
    init_model_dir("resnet18", root / "v1", name="tiny-a", version="1", **TINY["resnet18"])
    init_model_dir("vit-small", root / "v2", name="tiny-a", version="2", **TINY["vit-small"])
    return {"1": root / "v1", "2": root / "v2"}


def catalog_files(folder: Path, n_classes: int = 4, per_class: int = 4) -> list[tuple[str, Path, str]]:
    """(id, path, label) of distinct real photos (generated ones when Caltech-101 is absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    photos = caltech_photos(n_classes=n_classes, per_class=per_class)
    if photos:
        for i, (p, label) in enumerate(photos):
            out.append((f"img-{i:03d}", p, label))
    else:
        for i, data in enumerate(generated_photos(n_classes * per_class)):
            path = folder / f"g{i}.jpg"
            path.write_bytes(data)
            out.append((f"img-{i:03d}", path, f"g{i // per_class}"))
    return out


def golden_csv(labelled: list[tuple[str, str]], every: int) -> str:
    """A judgments CSV over ``(id, label)`` items: every ``every``-th item is a query whose
    relevant candidates are the other items of its label (grade 1)."""
    rows = ["query,candidate,grade"]
    for qid, qlbl in labelled[::every]:
        rows += [f"catalog:{qid},{cid},1" for cid, lbl in labelled if lbl == qlbl and cid != qid]
    return "\n".join(rows) + "\n"


def model_copy(src: Path, dest: Path, version: str, change=None) -> Path:
    """A copy of the model directory ``src`` as ``version`` (``change(meta)`` edits its metadata)."""
    import shutil

    from vsearch.predictor.model import read_meta, write_meta
    shutil.copytree(src, dest)
    meta = read_meta(dest)
    meta.version = version
    if change:
        change(meta)
    write_meta(dest, meta)
    return dest


def upsert_record(item_id: str, path: Path, label: str, ts: int):
    from vsearch.ingest.events import encode, encode_key, upsert_event
    return (encode_key(item_id), encode(upsert_event(item_id, uri=path.resolve().as_uri(),
                                                     metadata={"label": label}, ts=ts)))


def delete_record(item_id: str, ts: int):
    from vsearch.ingest.events import delete_event, encode, encode_key
    return (encode_key(item_id), encode(delete_event(item_id, ts=ts)))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "cluster", namespace="vs")
    try:
        yield c
    finally:
        c.close()


class SearchLoop:
    """Several threads searching with catalog images for the whole test (bounded in time and
    count): every answer must be 200, its top hit the queried image with score ~1, and its
    ``model_version`` must be the model of its ``collection`` (no mixed query)."""

    def __init__(self, url: str, items: list[tuple[str, bytes]], threads: int = 3, max_s: float = 600,
                 max_queries: int = 20000):
        self.url, self.items = url, items
        self.failed: list[str] = []
        self.mixed: list[str] = []
        self.answered = 0
        self.collections: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + max_s
        self._budget = max_queries
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> "SearchLoop":
        for t in self.threads:
            t.start()
        return self

    def _run(self, n: int) -> None:
        http = requests.Session()
        i = n
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self._budget <= 0:
                    return
                self._budget -= 1
            item_id, data = self.items[i % len(self.items)]
            i += 1
            try:
                r = http.post(f"{self.url}/search", files={"image": ("q.jpg", data, "image/jpeg")},
                              data={"k": "3"}, timeout=30)
            except requests.RequestException as exc:
                with self._lock:
                    self.failed.append(f"{item_id}: {exc}")
                continue
            with self._lock:
                if r.status_code != 200:
                    self.failed.append(f"{item_id}: {r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                coll, mv = body.get("collection"), body.get("model_version")
                self.collections[coll] = self.collections.get(coll, 0) + 1
                top = (body.get("results") or [{}])[0]
                if coll != f"images__{mv}" or top.get("id") != item_id or top.get("score", 0) < 0.999:
                    self.mixed.append(f"{item_id}: {coll} {mv} top={top.get('id')} {top.get('score')}")
                self.answered += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(40)


def unique(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:6]}"
