"""``vsearch demo`` (``make demo``): the whole platform on one machine.

Starts, each as its own process on a free local port: the Kafka-protocol broker (Tansu), Milvus
Lite as a server (``milvus-lite server``, shared by the consumer and the search service), the
embedder, the catalog consumer (``vsearch ingest``) and the search service with its web page.
Publishes a sample catalog through Kafka (scikit-image's bundled photos and variants of them:
crops, flips, colour shifts; or ``--catalog DIR``), waits until it is searchable (by searching),
prints the URL. Ctrl-C stops everything, in reverse order.

    vsearch demo                       # then open the printed URL
    vsearch demo --catalog ~/photos    # your own images
    vsearch demo --check               # one query end to end, then exit (0 = it worked)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ..core.images import image_files
from .samples import write_sample_catalog

log = logging.getLogger(__name__)


def folder_catalog(folder: str | os.PathLike) -> list[dict]:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise SystemExit(f"--catalog {folder}: not a folder")
    items = []
    for path in image_files(root):
        rel = path.relative_to(root)
        items.append({"id": str(rel.with_suffix("")).replace(os.sep, "/"), "path": str(path),
                      "metadata": {"label": rel.parent.name or root.name, "source": str(root)},
                      "visibility": "public"})
    if not items:
        raise SystemExit(f"--catalog {folder}: no image files in it")
    return items


def write_catalog_csv(items: list[dict], path: Path) -> None:
    """The catalog as the CSV ``vsearch publish`` reads: id,uri,metadata,visibility. The
    metadata carries each file's sha256 (``content_hash``) so exact duplicates collapse."""
    import csv
    import hashlib

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "uri", "metadata", "visibility"])
        for it in items:
            digest = hashlib.sha256(Path(it["path"]).read_bytes()).hexdigest()
            meta = {**it["metadata"], "content_hash": digest}
            w.writerow([it["id"], Path(it["path"]).as_uri(), json.dumps(meta), it["visibility"]])


def resolve_model(model_dir: str | None, data_dir: Path) -> tuple[Path, bool]:
    """(model directory, whether it is a random-initialised stand-in)."""
    from ..predictor.model_dir import default_model_dir
    from ..predictor.zoo import init_model_dir

    if model_dir:
        if not (Path(model_dir) / "config.json").exists():
            raise SystemExit(f"--model-dir {model_dir}: not a model directory (no config.json)")
        return Path(model_dir), False
    if (default_model_dir() / "config.json").exists():
        return default_model_dir(), False
    stand_in = data_dir / "model-random-resnet-tiny"
    if not (stand_in / "config.json").exists():
        init_model_dir("resnet-tiny", stand_in, name="random-resnet-tiny", version="0")
    return stand_in, True


def search_file(url: str, path: str | Path, *, k: int = 5, crop: str | None = None,
                log_impression: bool = True, timeout: float = 30.0) -> dict:
    import requests
    data = {"k": str(k)}
    if crop:
        data["crop"] = crop
    if not log_impression:
        data["log_impression"] = "false"
    with open(path, "rb") as fh:
        resp = requests.post(f"{url}/search", files={"image": (Path(path).name, fh.read())},
                             data=data, timeout=timeout)
    body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    if resp.status_code != 200:
        raise RuntimeError(f"search answered {resp.status_code}: {body.get('error', resp.text[:200])}")
    return body


def wait_searchable(url: str, items: list[dict], timeout: float, services=()) -> int:
    """Search with every public catalog image until each finds an identical indexed image
    (score >= 0.999): the catalog is searchable end to end. Returns how many are."""
    import requests

    public = [it for it in items if it["visibility"] == "public"]
    pending = list(public)
    deadline = time.monotonic() + timeout
    last_report, last_error = 0.0, None
    def found(it) -> bool:
        nonlocal last_error
        try:
            body = search_file(url, it["path"], k=1, log_impression=False)
            return bool(body["results"]) and body["results"][0]["score"] >= 0.999
        except (RuntimeError, OSError, ValueError, requests.RequestException) as exc:   # 503 until indexed
            last_error = str(exc)
            return False

    while pending and time.monotonic() < deadline:
        for svc in services:
            if not svc.alive():
                raise RuntimeError(f"{svc.name} stopped:\n{svc.log_tail()}")
        # Probe the last one published first; sweep the rest only once it is there.
        if found(pending[-1]):
            pending = [it for it in pending[:-1] if not found(it)]
        if time.monotonic() - last_report > 3 or not pending:
            print(f"  searchable: {len(public) - len(pending)}/{len(public)}", flush=True)
            last_report = time.monotonic()
        if pending:
            time.sleep(0.5)
    if pending:
        raise TimeoutError(f"{len(pending)} catalog images still not searchable after {timeout:.0f}s "
                           f"(e.g. {pending[0]['id']}; last error: {last_error})")
    return len(public)


def run_demo(*, model_dir: str | None = None, catalog: str | None = None, data_dir: str = ".demo",
             port: int = 8000, timeout: float = 300.0, check: bool = False, rollout: str | None = None,
             golden: str | None = None) -> int:
    from ..core.store import collection_name
    from ..predictor.model_dir import read_meta
    from .services import (
        Service,
        free_port,
        http_ok,
        port_open,
        start_broker,
        start_embedder,
        start_milvus_lite_server,
        vsearch_argv,
    )

    data = Path(data_dir).resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[Service] = []
    started_rollouts: list = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        model, random_init = resolve_model(model_dir, data)
        meta = read_meta(model)
        if random_init:
            print(f"NOTE: no trained model at models/default and no --model-dir: using a "
                  f"random-initialised resnet-tiny ({model}); results show the plumbing, not "
                  f"meaningful similarity.")
        print(f"model: {meta.name} version {meta.version} ({meta.family}, {meta.embedding_dim}-d) from {model}")
        if catalog:
            items = folder_catalog(catalog)
            image_root = Path(catalog).resolve()
            print(f"catalog: {len(items)} images from {catalog}")
        else:
            items = write_sample_catalog(data / "catalog")
            image_root = (data / "catalog").resolve()
            print(f"catalog: {len(items)} images (scikit-image sample photos and their variants) "
                  f"in {data / 'catalog'}; {sum(i['visibility'] == 'private' for i in items)} private")
        csv_path = data / "catalog.csv"
        write_catalog_csv(items, csv_path)

        if port and port_open(port):
            raise SystemExit(f"port {port} is in use: pass --http-port with a free one (or 0 for any)")
        port = port or free_port()

        print("starting the Kafka broker (Tansu) ...", flush=True)
        broker = start_broker(log_path=logs / "broker.log")
        started.append(broker)
        print("starting Milvus Lite (milvus-lite server) ...", flush=True)
        # The broker starts empty and the catalog is published again, so the index starts empty
        # too: a collection or alias left by an earlier run (a rollout's) would serve instead.
        shutil.rmtree(data / "milvus", ignore_errors=True)
        milvus = start_milvus_lite_server(data / "milvus", log_path=logs / "milvus.log")
        started.append(milvus)
        print("starting the embedder ...", flush=True)
        embedder = start_embedder(model, log_path=logs / "embedder.log", extra=("--threads", "2"))
        started.append(embedder)

        collection = collection_name(meta.name, meta.version)
        group = f"ingest-{collection}"                 # the consumer's group, retired after a rollout
        metrics_port = free_port()
        print(f"starting the catalog consumer (collection {collection}) ...", flush=True)
        consumer = Service("consumer", vsearch_argv(
            "ingest", "--bootstrap", broker.bootstrap, "--embedder-url", embedder.url,
            "--collection", collection, "--group", group, "--alias", "images", "--milvus-uri", milvus.uri,
            "--model-name", meta.name, "--model-version", meta.version,
            "--metrics-port", str(metrics_port), "--partitions", "1", "--file-roots", str(image_root)),
            port=metrics_port, log_path=logs / "consumer.log")
        started.append(consumer)
        consumer.wait_ready(120)

        print("starting the search service ...", flush=True)
        # A random-initialised network puts every photo close to every other: only exact
        # duplicates count as such then.
        dedup = "0.0001" if random_init else "0.01"
        search = Service("search", vsearch_argv(
            "serve", "search", "--embedder-url", embedder.url, "--milvus-uri", milvus.uri,
            "--alias", "images", "--bootstrap", broker.bootstrap, "--http-port", str(port),
            "--query-store", str(data / "queries"), "--model-version", meta.model_id,
            "--dedup-distance", dedup, "--image-roots", str(image_root)),
            port=port, log_path=logs / "search.log",
            ready=lambda: http_ok(f"http://127.0.0.1:{port}/v2/models/visual-search/ready"))
        started.append(search)
        search.wait_ready(120)

        print(f"publishing {len(items)} catalog events to Kafka ...", flush=True)
        import subprocess
        pub = subprocess.run(vsearch_argv("publish", str(csv_path), "--bootstrap", broker.bootstrap,
                                          "--no-progress", "--partitions", "1"),
                             capture_output=True, text=True, timeout=120)
        if pub.returncode != 0:
            raise RuntimeError(f"vsearch publish failed:\n{pub.stdout[-2000:]}\n{pub.stderr[-2000:]}")
        print("waiting until the catalog is searchable ...", flush=True)
        t0 = time.monotonic()
        n = wait_searchable(search.url, items, timeout, services=started)
        print(f"{n} public images searchable after {time.monotonic() - t0:.1f}s")

        if rollout:
            from .demo_rollout import run_rollout, serving_status
            rc = run_rollout(model_dir=rollout, bootstrap=broker.bootstrap, milvus_uri=milvus.uri,
                             search_url=search.url, log_dir=logs, golden=golden, keep=started_rollouts,
                             file_roots=str(image_root),
                             serving=serving_status(model=meta.name, version=meta.version, uri=str(model),
                                                    collection=collection, group=group,
                                                    embedder_url=embedder.url))
            if check:
                if rc == 0:
                    probe = next(i for i in items if i["visibility"] == "public")
                    body = search_file(search.url, probe["path"], k=1)
                    print(f"a query after the switch: answered by {body['model_version']} ({body['collection']}), "
                          f"top score {body['results'][0]['score']:.4f}")
                    if body["results"][0]["score"] < 0.999:
                        return 1
                return rc

        if check:
            return _check(search.url, broker.bootstrap, items)

        print(f"\n  Visual search is up:  {search.url}/\n"
              f"  API docs:             {search.url}/docs\n"
              f"  click-through rate:   vsearch ctr --bootstrap {broker.bootstrap}\n"
              f"  logs:                 {logs}\n\nPress Ctrl-C to stop.", flush=True)
        while True:
            for svc in started:
                if not svc.alive():
                    print(f"{svc.name} stopped unexpectedly:\n{svc.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not cut the clean-up short
        for w in started_rollouts:
            w.close()
        for svc in reversed(started):
            svc.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)
        if started:
            print("stopped: " + ", ".join(s.name for s in reversed(started)), flush=True)


def _check(url: str, bootstrap: str, items: list[dict]) -> int:
    """One query end to end: a crop of a catalog photo, a click on a result, and both events
    read back from search.events."""
    import requests

    from ..predictor.search.ctr import read_events

    public = [it for it in items if it["visibility"] == "public"]
    probe = next((it for it in public if it["id"] == "astronaut-original"), public[0])
    whole = search_file(url, probe["path"], k=5)
    top = whole["results"][0]
    print(f"query {probe['id']}: top result {top['id']} score {top['score']:.4f}")
    if top["score"] < 0.999:
        print("check failed: a catalog image did not find itself", file=sys.stderr)
        return 1
    cropped = search_file(url, probe["path"], k=5, crop="0.25,0.1,0.75,0.6")
    for r in cropped["results"]:
        print(f"  crop result {r['id']:<32} {r['score']:.4f}")
    private = {it["id"] for it in items if it["visibility"] == "private"}
    if private & {r["id"] for r in whole["results"] + cropped["results"]}:
        print("check failed: a private item was returned", file=sys.stderr)
        return 1
    clicked = cropped["results"][0]["id"]
    resp = requests.post(f"{url}/events", json={"type": "click", "token": cropped["token"],
                                                "item_id": clicked}, timeout=10)
    if resp.status_code != 200:
        print(f"check failed: click refused: {resp.text}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + 30
    kinds: set[str] = set()
    while time.monotonic() < deadline and kinds != {"impression", "click"}:
        kinds = {r["type"] for r in read_events(bootstrap, idle_timeout=1.5)
                 if r.get("query_id") == cropped["query_id"]}
    print(f"events on search.events for query {cropped['query_id']}: {sorted(kinds)}")
    if kinds != {"impression", "click"}:
        print("check failed: the impression and the click did not both reach search.events", file=sys.stderr)
        return 1
    print("demo check passed")
    return 0
