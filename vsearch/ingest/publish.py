"""``vsearch publish``: what a catalog owner runs (or does from its own service) to put image
changes on the catalog topic. Catalog owners only write to Kafka; the consumer does the rest.

- a folder: one upsert per image file (recursively), id = the path relative to the folder
  (without the extension), uri = ``file://`` of the file (or the bytes inline with ``--inline``),
  metadata ``{"path": <relative path>, "label": <parent folder>}``;
- a CSV with a header ``id,uri[,metadata][,visibility]`` (metadata as a JSON object);
- ``--delete ID...``: delete events.
Records are keyed by id (the topic is compacted on the key)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from ..core.images import image_files
from ..core.kafka import ensure_topics, send_and_confirm
from .events import BadEvent, delete_event, encode, encode_key, now_ms, upsert_event

log = logging.getLogger(__name__)


def folder_events(root: str | Path, *, inline: bool = False, visibility: str = "public",
                  ts: int | None = None) -> Iterator[dict]:
    root = Path(root).resolve()
    ts = now_ms() if ts is None else ts
    for path in image_files(root):
        rel = path.relative_to(root)
        id_ = rel.with_suffix("").as_posix()
        meta = {"path": rel.as_posix()}
        if len(rel.parts) > 1:
            meta["label"] = rel.parts[-2]
        if inline:
            yield upsert_event(id_, image=path.read_bytes(), metadata=meta, visibility=visibility, ts=ts)
        else:
            yield upsert_event(id_, uri=path.as_uri(), metadata=meta, visibility=visibility, ts=ts)


def csv_events(path: str | Path, *, visibility: str = "public", ts: int | None = None) -> Iterator[dict]:
    ts = now_ms() if ts is None else ts
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"id", "uri"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the CSV header needs columns id,uri[,metadata][,visibility]; "
                             f"missing {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                meta = json.loads(row["metadata"]) if row.get("metadata") else {}
                yield upsert_event(row["id"], uri=row["uri"], metadata=meta,
                                   visibility=row.get("visibility") or visibility, ts=ts)
            except (ValueError, BadEvent) as exc:
                raise ValueError(f"{path}:{line}: {exc}") from exc


def publish_events(bootstrap: str, topic: str, events: Iterable[dict], *, progress: bool = False,
                   total: int | None = None, create_topic: bool = True, partitions: int = 3,
                   timeout_s: float = 30.0) -> int:
    """Send events keyed by id and wait until the broker acknowledged all of them; returns the
    number sent. Raises the first send error (after kafka-python's own retries)."""
    if create_topic:
        ensure_topics(bootstrap, {topic: partitions}, compact={topic})
    items = events
    if progress:
        items = tqdm(events, total=total, unit="event", desc=f"publish {topic}")
    sent = 0

    def records():                       # sent as they are read, as the progress bar shows
        nonlocal sent
        for ev in items:
            sent += 1
            yield encode_key(ev["id"]), encode(ev)

    send_and_confirm(bootstrap, topic, records(), timeout=timeout_s, client_id="vsearch-publish",
                     linger_ms=10, batch_size=256 * 1024)
    return sent


def run(args) -> int:
    if not args.path and not args.delete:
        raise SystemExit("give a folder or CSV to publish, or --delete ID...")
    events: list[dict] = []
    try:
        if args.path:
            path = Path(args.path)
            if path.is_dir():
                events += list(folder_events(path, inline=args.inline, visibility=args.visibility))
            elif path.suffix.lower() == ".csv":
                events += list(csv_events(path, visibility=args.visibility))
            else:
                raise SystemExit(f"{path} is neither a folder nor a .csv file")
        events += [delete_event(i) for i in args.delete or ()]
    except ValueError as exc:            # BadEvent included: nothing has been sent
        raise SystemExit(f"nothing published: {exc}") from exc
    n = publish_events(args.kafka_bootstrap, args.topic, events, progress=not args.no_progress,
                       total=len(events), partitions=args.partitions)
    print(f"published {n} events to {args.topic}")
    return 0
