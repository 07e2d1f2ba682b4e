"""Training and evaluation data: labelled image folders, pair CSVs, click pairs from Kafka,
the held-out split, and the torch datasets that turn them into augmented views.

Sources of data (``--data``):

* a folder of images, class per sub-folder (``cats/1.jpg``) or with a ``labels.csv``
  (``path,label``, paths relative to the folder: the Caltech-101 subset's layout). Labels are
  used only by evaluation; SimCLR ignores them.
* a CSV of pairs: a query image and the image clicked for it, columns ``query`` (or
  ``query_uri``/``query_path``) and ``clicked`` (or ``clicked_uri``/``clicked_path``/``item_uri``),
  optional ``crop`` (``x0,y0,x1,y1`` normalised, the part of the query that was searched);
  paths relative to the CSV, ``file://`` or ``http(s)://`` URIs.
* ``kafka://HOST:PORT[/TOPIC]``: click events on ``search.events`` (see
  :mod:`vsearch.core.search_events`); every click with both ``query_uri`` and ``item_uri`` is a pair
  (with the click's ``crop`` applied to the query). ``catalog:<id>`` URIs cannot be read by the
  trainer yet: such pairs are counted as unreadable in the run log.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import functools
import logging
import random
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..core import search_events
from ..core.fetch import FetchConfig, Fetcher, FetchError
from ..core.images import IMAGE_SUFFIXES, image_files
from ..predictor.preprocess import InvalidImage, PreprocessConfig, parse_crop, parse_crop_text
from .augment import training_image

log = logging.getLogger(__name__)
QUERY_COLS = ("query", "query_uri", "query_path")
CROP_MARK = "#crop="
CLICKED_COLS = ("clicked", "clicked_uri", "clicked_path", "item_uri", "item_path")


class DataError(ValueError):
    """The data given to the trainer or evaluator cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageRecord:
    source: str               # a path or URI
    label: str | None = None


# --------------------------------------------------------------------------- reading sources

@functools.lru_cache(maxsize=1)
def _fetcher() -> Fetcher:
    return Fetcher(FetchConfig(read_timeout=30.0, total_timeout=60.0, schemes=SCHEMES))


SCHEMES = ("file", "http", "https", "s3")


def read_source(source: str) -> bytes:
    """Bytes of a path, ``file://``, ``http(s)://`` or ``s3://`` URI (through the platform's one
    fetcher: size limit, timeouts, retries, checked redirects; S3 with the process's AWS settings)."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme not in SCHEMES:
        raise DataError(f"cannot read {source!r}: scheme {parsed.scheme!r} is not a path, "
                        f"file://, http(s):// or s3:// URI")
    uri = source if parsed.scheme in SCHEMES else Path(source).resolve().as_uri()
    try:
        return _fetcher().fetch(uri)
    except FetchError as exc:
        raise DataError(f"cannot read {source}: {exc}") from exc


def with_crop(source: str, crop) -> str:
    """A source key naming a crop of an image: ``<source>#crop=x0,y0,x1,y1``."""
    box = parse_crop(crop)
    return source if box is None else f"{source}{CROP_MARK}{','.join(f'{v:g}' for v in box)}"


def split_crop(key: str):
    """Inverse of :func:`with_crop`: (source, box or None)."""
    source, mark, box = key.partition(CROP_MARK)
    return (source, parse_crop_text(box)) if mark else (key, None)


def _resolve(value: str, base: Path) -> str:
    value = value.strip()
    if "://" in value or Path(value).is_absolute():
        return value
    return str(base / value)


def list_images(folder: str | Path) -> list[ImageRecord]:
    """Images of a folder with their labels: ``labels.csv`` when present, else the name of the
    first-level sub-folder (images directly in the folder have no label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    labels_csv = folder / "labels.csv"
    if labels_csv.exists():
        with open(labels_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise DataError(f"{labels_csv} needs the columns path,label")
        return [ImageRecord(_resolve(r["path"], folder), r["label"]) for r in rows]
    out = []
    for p in image_files(folder):
        rel = p.relative_to(folder)
        out.append(ImageRecord(str(p), rel.parts[0] if len(rel.parts) > 1 else None))
    if not out:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def split_holdout(records: Sequence[ImageRecord], fraction: float, seed: int = 0
                  ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held_out): whole images held out, the same fraction of every label, chosen by a
    seeded draw per label so the split does not depend on the listing order."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"held-out fraction must be in [0, 1), got {fraction}")
    by_label: dict[str | None, list[ImageRecord]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    held = set()
    for label, group in by_label.items():
        group = sorted(group, key=lambda r: r.source)
        k = int(round(len(group) * fraction))
        held.update(r.source for r in random.Random(f"{seed}-{label}").sample(group, k))
    train = [r for r in records if r.source not in held]
    return train, [r for r in records if r.source in held]


def select_split(records: list[ImageRecord], split: str, fraction: float, seed: int
                 ) -> list[ImageRecord]:
    if split == "all":
        return list(records)
    train, held = split_holdout(records, fraction, seed)
    if split == "train":
        return train
    if split in ("held-out", "heldout", "test"):
        return held
    raise DataError(f"unknown split {split!r}: expected all, train or held-out")


def read_csv_header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [c.strip() for c in next(csv.reader(f), [])]


def _pick(row: dict, names: Sequence[str]) -> str | None:
    for n in names:
        if row.get(n):
            return row[n]
    return None


def read_pairs_csv(path: str | Path) -> list[tuple[str, str]]:
    """(query, clicked) sources from a CSV; relative paths are relative to the CSV."""
    path = Path(path)
    header = read_csv_header(path)
    if not any(c in header for c in QUERY_COLS) or not any(c in header for c in CLICKED_COLS):
        raise DataError(f"{path}: a pairs CSV needs a query column ({'/'.join(QUERY_COLS)}) and "
                        f"a clicked column ({'/'.join(CLICKED_COLS)}); got {header}")
    pairs = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            q, c = _pick(row, QUERY_COLS), _pick(row, CLICKED_COLS)
            if not q or not c:
                raise DataError(f"{path} line {i}: empty query or clicked value")
            try:
                query = with_crop(_resolve(q, path.parent), parse_crop_text(row.get("crop")))
            except InvalidImage as exc:
                raise DataError(f"{path} line {i}: {exc}") from exc
            pairs.append((query, _resolve(c, path.parent)))
    if not pairs:
        raise DataError(f"{path} holds no pairs")
    return pairs


def read_click_log(bootstrap: str, topic: str | None = None, *, timeout_s: float = 60.0,
                   idle_s: float = 3.0) -> tuple[search_events.ClickLog, int]:
    """The counted click log of ``topic`` (:func:`vsearch.core.search_events.count_clicks`) and
    the number of events read.

    Reads every partition from the beginning until no record has arrived for ``idle_s``
    (end offsets are not trusted: some Kafka-protocol brokers report them wrongly), within
    ``timeout_s``. Nothing is committed."""
    topic = topic or search_events.TOPIC
    records = []
    try:
        for rec in search_events.read_all(bootstrap, topic, idle_s=idle_s, timeout_s=timeout_s,
                                          client_id="vsearch-trainer"):
            if isinstance(rec, search_events.BadSearchEvent):
                log.warning("skipping bad search event %s", rec)
            records.append(rec)
    except LookupError as exc:
        raise DataError(str(exc)) from exc
    except TimeoutError as exc:
        raise DataError(f"{exc}; raise the timeout") from exc
    return search_events.count_clicks(records), len(records)


def click_log_stats(clicks: search_events.ClickLog, events: int) -> dict:
    """What the click log held and what did not count (for the run log and the metadata)."""
    return {"events": events, "clicks": clicks.raw_clicks, "counted_clicks": len(clicks.clicks),
            "clicks_not_counted": sum(clicks.not_counted.values()), "bad_events": clicks.bad}


def click_pairs_from_kafka(bootstrap: str, topic: str | None = None, *, timeout_s: float = 60.0,
                           idle_s: float = 3.0) -> tuple[list[tuple[str, str]], dict]:
    """Every click that counts (:func:`vsearch.core.search_events.count_clicks`: once per
    (query, item), with its impression) that has a ``query_uri`` and an ``item_uri`` -> a pair
    (:func:`read_click_log`). Returns the pairs and counts of what was skipped and why, so
    nothing is dropped unseen. The trainer reads the topic through
    :func:`vsearch.trainer.clicks.click_pairs`, which adds propensity weights and negatives."""
    clicks, events = read_click_log(bootstrap, topic, timeout_s=timeout_s, idle_s=idle_s)
    stats = {**click_log_stats(clicks, events), "pairs": 0, "clicks_without_uris": 0}
    pairs: list[tuple[str, str]] = []
    for rec in clicks.clicks:
        if not rec.get("query_uri") or not rec.get("item_uri"):
            stats["clicks_without_uris"] += 1
            continue
        try:
            query = with_crop(rec["query_uri"], rec.get("crop"))
        except InvalidImage:
            stats["bad_events"] += 1
            continue
        pairs.append((query, rec["item_uri"]))
    stats["pairs"] = len(pairs)
    return pairs, stats


# --------------------------------------------------------------------------- image cache

class ImageCache:
    """Decoded, downsized training images kept in memory (decoded once, on a thread pool).
    Images that cannot be read are listed in ``.failed`` with the reason, not silently lost."""

    def __init__(self, sources: Sequence[str], cfg: PreprocessConfig, workers: int = 2,
                 reader: Callable[[str], bytes] = read_source):
        self.cfg = cfg
        unique = list(dict.fromkeys(sources))
        self.images: dict[str, Image.Image] = {}
        self.failed: dict[str, str] = {}

        def load(key):
            src, crop = split_crop(key)
            try:
                return key, training_image(reader(src), cfg, crop=crop), None
            except (InvalidImage, OSError, DataError) as exc:
                return key, None, f"{type(exc).__name__}: {exc}"

        with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for src, img, err in pool.map(load, unique):
                if img is None:
                    self.failed[src] = err
                    log.warning("skipping %s: %s", src, err)
                else:
                    self.images[src] = img

    def __contains__(self, src: str) -> bool:
        return src in self.images

    def __getitem__(self, src: str) -> Image.Image:
        return self.images[src]


# --------------------------------------------------------------------------- datasets

def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator that depends only on (seed, epoch, index): the same views after a resume
    and whatever the number of loader workers."""
    return random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index)


class SimCLRDataset(torch.utils.data.Dataset):
    """Item i -> two independent augmented views of image i."""

    def __init__(self, cache: ImageCache, sources: Sequence[str], augment, seed: int = 0):
        self.cache, self.augment, self.seed, self.epoch = cache, augment, seed, 0
        self.sources = [s for s in sources if s in cache]

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        rng = item_rng(self.seed, self.epoch, i)
        img = self.cache[self.sources[i]]
        return torch.from_numpy(self.augment(img, rng)), torch.from_numpy(self.augment(img, rng))


class PairDataset(torch.utils.data.Dataset):
    """Item i -> {"q": query view, "c": clicked view} of pair i; with ``negatives``
    ({query: [sources]}) also "neg", a view of one of the query's hard negatives, and "has_neg",
    whether it has one; with ``weights`` (one per pair: the click's inverse propensity) "w"."""

    def __init__(self, cache: ImageCache, pairs: Sequence[tuple[str, str]], augment, seed: int = 0,
                 negatives: dict[str, list[str]] | None = None, weights: Sequence[float] | None = None):
        self.cache, self.augment, self.seed, self.epoch = cache, augment, seed, 0
        if weights is not None and len(weights) != len(pairs):
            raise ValueError(f"{len(weights)} weights for {len(pairs)} pairs")
        keep = [i for i, (q, c) in enumerate(pairs) if q in cache and c in cache]
        self.pairs = [pairs[i] for i in keep]
        self.weights = None if weights is None else [float(weights[i]) for i in keep]
        self.negatives = None if negatives is None else {
            q: [n for n in negs if n in cache] for q, negs in negatives.items()}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        rng = item_rng(self.seed, self.epoch, i)
        q, c = self.pairs[i]
        item = {"q": torch.from_numpy(self.augment(self.cache[q], rng)),
                "c": torch.from_numpy(self.augment(self.cache[c], rng))}
        if self.weights is not None:
            item["w"] = torch.tensor(self.weights[i], dtype=torch.float32)
        if self.negatives is not None:
            negs = self.negatives.get(q) or []
            item["has_neg"] = torch.tensor(bool(negs))
            item["neg"] = (torch.from_numpy(self.augment(self.cache[rng.choice(negs)], rng)) if negs
                           else torch.zeros_like(item["q"]))
        return item


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of an epoch; a function of (seed, epoch) so resume replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)
