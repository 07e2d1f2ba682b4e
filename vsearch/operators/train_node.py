"""``vsearch train-node``: what each pod of a training run (:mod:`vsearch.operators.training`)
runs. It prepares the node, then runs the command after ``--`` (torchrun) as it is written:

1. the serving model: ``--init-uri`` ``s3://bucket/prefix`` is downloaded into ``--init-dir``
   (a path is used in place: the command already names it);
2. the catalog: the catalog topic (``--catalog-bootstrap``/``--catalog-topic``, compacted:
   the last event per id wins, deletes remove) as of ``--catalog-until-ms`` (records written
   later are left out, so every node of a run sees the same catalog) is read (``file://``,
   ``http(s)://``, ``s3://`` or inline) into ``--catalog-dir``, one sub-folder per
   ``metadata.label``: the folder layout ``vsearch train --catalog`` and its judge read (the
   whole catalog is copied to the pod's scratch volume: size it for the catalog);
3. ``torchrun ...`` (``python -m torch.distributed.run``, so no ``torchrun`` on the PATH is needed);
4. on node 0, when it succeeded: ``--out-dir`` is uploaded to ``--upload-to`` (``s3://``).

The exit status is torchrun's (or 2 when preparing failed)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ..core.config import Flags

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("train-node", help="one node of a training run the operator started (prepare, torchrun, "
                                          "upload)",
                       description="Prepares a training node (serving model, catalog snapshot), runs the "
                                   "command after -- (torchrun), and on node 0 uploads the model directory. "
                                   "The operator's training Jobs and TrainJobs run it.")
    f = Flags(p, "TRAIN_NODE")
    f.add("--catalog-bootstrap", default="", help="Kafka bootstrap of the catalog topic")
    f.add("--catalog-topic", default="catalog.images", help="the compacted catalog topic")
    f.add("--catalog-dir", default="", help="where labels.csv of the catalog snapshot goes")
    f.add("--catalog-until-ms", default=0, type=int, help="leave out records written after this (epoch ms; 0: now)")
    f.add("--init-uri", default="", help="the serving model (s3:// is downloaded, a path used in place)")
    f.add("--init-dir", default="", help="where an s3:// serving model is downloaded to")
    f.add("--out-dir", default="", help="the model directory the command writes")
    f.add("--upload-to", default="", help="s3:// prefix node 0 uploads --out-dir to (empty: written in place)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- torchrun ...")
    p.set_defaults(handler=_train_node)


def node_rank() -> int:
    for name in ("JOB_COMPLETION_INDEX", "PET_NODE_RANK", "GROUP_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def snapshot_catalog(bootstrap: str, topic: str, folder: Path, until_ms: int) -> int:
    """The catalog as of ``until_ms`` -> image files in ``folder``, one sub-folder per
    ``metadata.label`` (``_`` without one): the folder layout ``vsearch train --catalog`` and
    the judge read. Returns the images written; items that cannot be read are logged and left out."""
    import hashlib
    import re

    from ..core.fetch import FetchConfig, Fetcher
    from ..core.images import IMAGE_SUFFIXES
    from ..core.kafka import read_topic
    from ..ingest.events import BadEvent, decode
    items: dict[str, tuple[str | bytes, str]] = {}
    bad = 0
    for m in read_topic(bootstrap, topic, idle_s=2.0, timeout_s=600, client_id="vsearch-train-node"):
        if until_ms and m.timestamp is not None and m.timestamp > until_ms:
            continue
        try:
            ev = decode(m.key, m.value, m.timestamp)
        except BadEvent:
            bad += 1
            continue
        if ev.op == "delete":
            items.pop(ev.id, None)
        else:
            items[ev.id] = (ev.uri or ev.image, str((ev.metadata or {}).get("label") or ""))
    if not items:
        raise ValueError(f"the catalog topic {topic!r} on {bootstrap} holds no items")
    ids = sorted(items)
    uris = [items[i][0] for i in ids if isinstance(items[i][0], str)]
    with Fetcher(FetchConfig(schemes=("file", "http", "https", "s3"), allow_private=True)) as fetcher:
        fetched = dict(zip(uris, fetcher.fetch_many(uris)))
    written = failed = 0
    for item_id in ids:
        source, label = items[item_id]
        data = fetched[source] if isinstance(source, str) else source
        if isinstance(data, Exception):
            failed += 1
            log.warning("catalog item %s: %s", item_id, data)
            continue
        suffix = Path(source.split("?")[0]).suffix.lower() if isinstance(source, str) else ""
        sub = folder / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip(".") or "_")
        sub.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(item_id.encode()).hexdigest()[:16]
        (sub / f"{name}{suffix if suffix in IMAGE_SUFFIXES else '.jpg'}").write_bytes(data)
        written += 1
    if not written:
        raise ValueError(f"none of the {len(items)} catalog items could be read")
    log.info("catalog snapshot: %d images in %s (%d unreadable, %d bad records skipped)", written, folder,
             failed, bad)
    return written


def download_s3(uri: str, dest: Path) -> None:
    from ..core.objects import s3_client, split_s3
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    s3 = s3_client()
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents") or []:
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/") or rel.startswith("checkpoints/"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            n += 1
    if not n:
        raise ValueError(f"no model directory at {uri}")
    log.info("downloaded %d files of %s to %s", n, uri, dest)


def upload_s3(src: Path, uri: str) -> None:
    from ..core.objects import s3_client, split_s3
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    s3 = s3_client()
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and "checkpoints" not in p.relative_to(src).parts]
    # the metadata last: a reader that finds vsearch_model.json finds the weights too
    files.sort(key=lambda p: p.name == "vsearch_model.json")
    for p in files:
        s3.upload_file(str(p), bucket, prefix + p.relative_to(src).as_posix())
    log.info("uploaded %d files of %s to %s", len(files), src, uri)


def _train_node(args) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("vsearch train-node: give the command after --", file=sys.stderr)
        return 2
    try:
        if args.init_uri.startswith("s3://"):
            if not args.init_dir:
                raise ValueError("--init-dir is required with an s3:// --init-uri")
            download_s3(args.init_uri, Path(args.init_dir))
        if args.catalog_dir:
            snapshot_catalog(args.catalog_bootstrap, args.catalog_topic, Path(args.catalog_dir),
                             args.catalog_until_ms or int(time.time() * 1000))
    except (ValueError, LookupError, TimeoutError, OSError) as exc:
        print(f"vsearch train-node: preparing the node failed: {exc}", file=sys.stderr)
        return 2
    if command[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
    log.info("node %d: %s", node_rank(), " ".join(command))
    rc = subprocess.call(command)
    if rc != 0:
        return rc
    if args.upload_to and node_rank() == 0:
        try:
            upload_s3(Path(args.out_dir), args.upload_to)
        except Exception as exc:  # noqa: BLE001  (storage: the run failed, say why)
            print(f"vsearch train-node: uploading {args.out_dir} to {args.upload_to} failed: {exc}", file=sys.stderr)
            return 3
    return 0
