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

The steps, in :func:`run_demo`: :func:`check_arguments` (before anything starts),
:func:`start_platform`, :func:`publish_catalog`, :func:`wait_searchable`, then either the
rollout (``--rollout``), the check (``--check``) or :func:`report` and :func:`watch`.
"""

from __future__ import annotations

import csv
import faulthandler
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from PIL import Image

from ..core.config import UsageError
from ..core.images import image_files
from ..core.naming import DEFAULT_ALIAS, collection_name
from ..predictor.model_dir import ModelDirError, ModelMeta, default_model_dir, read_meta
from ..predictor.search.ctr import read_events
from .demo_rollout import run_rollout, serving_status
from .samples import write_sample_catalog
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

log = logging.getLogger(__name__)


def folder_catalog(folder: str | os.PathLike) -> list[dict]:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--catalog {folder}: not a folder")
    items = []
    for path in image_files(root):
        rel = path.relative_to(root)
        items.append({"id": str(rel.with_suffix("")).replace(os.sep, "/"), "path": str(path),
                      "metadata": {"label": rel.parent.name or root.name, "source": str(root)},
                      "visibility": "public"})
    if not items:
        raise UsageError(f"--catalog {folder}: no image files in it")
    return items


def write_catalog_csv(items: list[dict], path: Path) -> None:
    """The catalog as the CSV ``vsearch publish`` reads: id,uri,metadata,visibility. The
    metadata carries each file's sha256 (``content_hash``) so exact duplicates collapse."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "uri", "metadata", "visibility"])
        for it in items:
            digest = hashlib.sha256(Path(it["path"]).read_bytes()).hexdigest()
            meta = {**it["metadata"], "content_hash": digest}
            w.writerow([it["id"], Path(it["path"]).as_uri(), json.dumps(meta), it["visibility"]])


# --------------------------------------------------------------------------- arguments

@dataclass
class Plan:
    """The demo's arguments, checked: what it will serve, publish and roll out."""
    data: Path
    port: int                                 # 0: any free port
    model_dir: Path | None                    # None: models/default, else a random-init stand-in
    items: list[dict] | None                  # a --catalog folder's items; None: the sample catalog
    image_root: Path | None
    rollout: Path | None = None
    golden: Path | None = None
    experiment: str | None = None             # ab | interleave: the rollout's online experiment
    simulate_users: int = 0
    loop: bool = False                        # one turn of the learning loop (demo_loop)
    train_steps: int = 30
    train_timeout: float = 1800.0


def model_dir_arg(flag: str, value: str) -> tuple[Path, ModelMeta]:
    """A model-directory argument, or a :class:`UsageError` that says what is wrong with it."""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: no such folder (a model directory: `vsearch train --out DIR` "
                         f"or `vsearch model init --out DIR` makes one)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {value}: not a model directory (no config.json)")
    try:
        return path, read_meta(path)
    except ModelDirError as exc:
        raise UsageError(f"{flag} {value}: {exc}") from None


def check_arguments(*, model_dir: str | None, catalog: str | None, data_dir: str, port: int,
                    rollout: str | None, golden: str | None, experiment: str | None = None,
                    simulate_users: int = 0, loop: bool = False, train_steps: int = 30) -> Plan:
    """Every argument checked before anything starts: a wrong one is one line, not a traceback
    after the five services have started."""
    data = Path(data_dir).expanduser().resolve()
    if data.exists() and not data.is_dir():
        raise UsageError(f"--data-dir {data_dir}: exists and is not a folder")
    if not 0 <= port < 65536:
        raise UsageError(f"--http-port {port}: not a port (0: any free port)")
    if port and port_open(port):
        raise UsageError(f"--http-port {port}: in use; pass a free one (or 0 for any)")
    model = model_dir_arg("--model-dir", model_dir)[0] if model_dir else None
    items = folder_catalog(catalog) if catalog else None
    plan = Plan(data=data, port=port, model_dir=model, items=items,
                image_root=Path(catalog).expanduser().resolve() if catalog else None)
    if loop and rollout:
        raise UsageError("--loop rolls out the model it trains: leave --rollout out")
    if loop and not simulate_users:
        raise UsageError("--loop trains from clicks: give --simulate-users N (N simulated users search and click)")
    if loop and not 1 <= train_steps <= 100_000:
        raise UsageError(f"--train-steps {train_steps}: a number of optimiser steps from 1 to 100000")
    plan.loop, plan.train_steps = loop, train_steps
    if rollout:
        plan.rollout = model_dir_arg("--rollout", rollout)[0]
    if golden:
        if not rollout and not loop:
            raise UsageError("--golden is the rollout's gate: give --rollout MODEL_DIR with it")
        if not Path(golden).is_file():
            raise UsageError(f"--golden {golden}: no such file (a CSV of query,candidate,grade)")
        plan.golden = Path(golden)
    if experiment:
        if not rollout and not loop:
            raise UsageError("--experiment runs between the serving version and a new one: give --rollout MODEL_DIR")
        if experiment not in ("ab", "interleave"):
            raise UsageError(f"--experiment {experiment}: ab or interleave")
        plan.experiment = experiment
    if simulate_users < 0 or simulate_users > 100_000:
        raise UsageError(f"--simulate-users {simulate_users}: a number of users from 0 to 100000")
    if simulate_users and not experiment and not loop:
        raise UsageError("--simulate-users clicks for an online experiment or the learning loop: give "
                         "--experiment ab|interleave or --loop")
    plan.simulate_users = simulate_users
    return plan


def resolve_model(model_dir: str | os.PathLike | None, data_dir: Path) -> tuple[Path, bool]:
    """(model directory, whether it is a random-initialised stand-in)."""
    if model_dir:
        if not (Path(model_dir) / "config.json").exists():
            raise UsageError(f"--model-dir {model_dir}: not a model directory (no config.json)")
        return Path(model_dir), False
    if (default_model_dir() / "config.json").exists():
        return default_model_dir(), False
    from ..predictor.zoo import init_model_dir
    stand_in = data_dir / "model-random-resnet-tiny"
    if not (stand_in / "config.json").exists():
        init_model_dir("resnet-tiny", stand_in, name="random-resnet-tiny", version="0")
    return stand_in, True


def search_file(url: str, path: str | Path, *, k: int = 5, crop: str | None = None,
                log_impression: bool = True, timeout: float = 30.0) -> dict:
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


# --------------------------------------------------------------------------- the platform

@dataclass
class Platform:
    """The demo's processes, newest last (stopped newest first), and what they serve."""
    model: Path
    meta: ModelMeta
    random_init: bool
    items: list[dict]
    image_root: Path
    started: list[Service] = field(default_factory=list)
    rollouts: list = field(default_factory=list)        # a rollout's local workloads
    broker: Service | None = None
    milvus: Service | None = None
    embedder: Service | None = None
    search: Service | None = None
    collection: str = ""
    group: str = ""

    def start(self, service: Service) -> Service:
        self.started.append(service)
        return service

    def stop(self) -> None:
        for w in self.rollouts:
            w.close()
        slow = []
        for svc in reversed(self.started):
            t0 = time.monotonic()
            rc = svc.stop()
            took = time.monotonic() - t0
            if took > 5:                        # SIGTERM ignored for long: say which, for the logs
                slow.append(f"{svc.name} {took:.1f}s (exit {rc})")
        if slow:
            print("slow to stop: " + ", ".join(slow), flush=True)
        if self.started:
            print("stopped: " + ", ".join(s.name for s in reversed(self.started)), flush=True)


def prepare(plan: Plan) -> Platform:
    """The model and the catalog (written to the data folder when it is the sample one)."""
    model, random_init = resolve_model(plan.model_dir, plan.data)
    meta = read_meta(model)
    if random_init:
        print(f"NOTE: no trained model at models/default and no --model-dir: using a "
              f"random-initialised resnet-tiny ({model}); results show the plumbing, not "
              f"meaningful similarity.")
    print(f"model: {meta.name} version {meta.version} ({meta.family}, {meta.embedding_dim}-d) from {model}")
    if plan.items is not None:
        items, image_root = plan.items, plan.image_root
        print(f"catalog: {len(items)} images from {image_root}")
    else:
        items = write_sample_catalog(plan.data / "catalog")
        image_root = (plan.data / "catalog").resolve()
        print(f"catalog: {len(items)} images (scikit-image sample photos and their variants) "
              f"in {image_root}; {sum(i['visibility'] == 'private' for i in items)} private")
    return Platform(model=model, meta=meta, random_init=random_init, items=items, image_root=image_root)


def start_platform(p: Platform, data: Path, port: int) -> None:
    """Broker, Milvus Lite server, embedder, consumer, search service: each its own process."""
    logs = data / "logs"
    print("starting the Kafka broker (Tansu) ...", flush=True)
    p.broker = p.start(start_broker(log_path=logs / "broker.log"))
    print("starting Milvus Lite (milvus-lite server) ...", flush=True)
    # The broker starts empty and the catalog is published again, so the index starts empty
    # too: a collection or alias left by an earlier run (a rollout's) would serve instead.
    shutil.rmtree(data / "milvus", ignore_errors=True)
    p.milvus = p.start(start_milvus_lite_server(data / "milvus", log_path=logs / "milvus.log"))
    print("starting the embedder ...", flush=True)
    p.embedder = p.start(start_embedder(p.model, log_path=logs / "embedder.log", extra=("--threads", "2")))

    meta = p.meta
    p.collection = collection_name(meta.name, meta.version)
    p.group = f"ingest-{p.collection}"                 # the consumer's group, retired after a rollout
    metrics_port = free_port()
    print(f"starting the catalog consumer (collection {p.collection}) ...", flush=True)
    consumer = p.start(Service("consumer", vsearch_argv(
        "ingest", "--bootstrap", p.broker.bootstrap, "--embedder-url", p.embedder.url,
        "--collection", p.collection, "--group", p.group, "--alias", DEFAULT_ALIAS, "--milvus-uri", p.milvus.uri,
        "--model-name", meta.name, "--model-version", meta.version,
        "--metrics-port", str(metrics_port), "--partitions", "1", "--file-roots", str(p.image_root)),
        port=metrics_port, log_path=logs / "consumer.log"))
    consumer.wait_ready(120)

    print("starting the search service ...", flush=True)
    # A random-initialised network puts every photo close to every other: only exact
    # duplicates count as such then.
    dedup = "0.0001" if p.random_init else "0.01"
    p.search = p.start(Service("search", vsearch_argv(
        "serve", "search", "--embedder-url", p.embedder.url, "--milvus-uri", p.milvus.uri,
        "--alias", DEFAULT_ALIAS, "--bootstrap", p.broker.bootstrap, "--http-port", str(port),
        "--query-store", str(data / "queries"), "--model-version", meta.model_id,
        "--dedup-distance", dedup, "--image-roots", str(p.image_root),
        # the embedders a rollout starts (vsearch demo --rollout) listen on local ports
        "--allowed-embedder-urls", "http://127.0.0.1:*"),
        port=port, log_path=logs / "search.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/v2/models/visual-search/ready")))
    p.search.wait_ready(120)


def publish_catalog(p: Platform, data: Path) -> None:
    """The catalog through Kafka, as a catalog owner publishes it (``vsearch publish``)."""
    csv_path = data / "catalog.csv"
    write_catalog_csv(p.items, csv_path)
    print(f"publishing {len(p.items)} catalog events to Kafka ...", flush=True)
    pub = subprocess.run(vsearch_argv("publish", str(csv_path), "--bootstrap", p.broker.bootstrap,
                                      "--no-progress", "--partitions", "1"),
                         capture_output=True, text=True, timeout=120)
    if pub.returncode != 0:
        raise RuntimeError(f"vsearch publish failed:\n{pub.stdout[-2000:]}\n{pub.stderr[-2000:]}")


def roll_out(p: Platform, plan: Plan, *, check: bool) -> int:
    """``--rollout``: the operator's rollout logic on local processes; with ``--check``, one
    query after the switch must be answered by the new version."""
    rc = run_rollout(model_dir=str(plan.rollout), bootstrap=p.broker.bootstrap, milvus_uri=p.milvus.uri,
                     search_url=p.search.url, log_dir=plan.data / "logs", golden=plan.golden and str(plan.golden),
                     keep=p.rollouts, file_roots=str(p.image_root),
                     experiment=plan.experiment, simulate_users=plan.simulate_users, items=p.items,
                     serving=serving_status(model=p.meta.name, version=p.meta.version, uri=str(p.model),
                                            collection=p.collection, group=p.group,
                                            embedder_url=p.embedder.url))
    if check and rc == 0:
        body = search_file(p.search.url, query_image(p.items)["path"], k=1)
        print(f"a query after the switch: answered by {body['model_version']} ({body['collection']}), "
              f"top score {body['results'][0]['score']:.4f}")
        if body["results"][0]["score"] < 0.999:
            return 1
    return rc


def query_image(items: list[dict]) -> dict:
    """The catalog item the demo queries with (and offers as ``DATA_DIR/query.jpg``)."""
    public = [it for it in items if it["visibility"] == "public"]
    return next((it for it in public if it["id"] == "astronaut-original"), public[0])


def vsearch_command() -> str:
    """How to run ``vsearch`` from the shell the demo was started in: ``vsearch`` when it is on
    PATH, else the script beside this interpreter (``.venv/bin/vsearch``)."""
    script = Path(sys.executable).parent / "vsearch"
    on_path = shutil.which("vsearch")
    if on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        return "vsearch"
    if script.exists():
        return shown(script)
    return f"{sys.executable} -m vsearch"


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when it is inside it."""
    path = Path(path).absolute()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def report(p: Platform, data: Path) -> None:
    """The URLs, a query image that exists and commands that work as printed; the same in
    ``DATA_DIR/demo.env`` for another shell (``. .demo/demo.env``)."""
    query = data / "query.jpg"
    with Image.open(query_image(p.items)["path"]) as img:
        img.convert("RGB").save(query, quality=92)
    env = data / "demo.env"
    env.write_text(f"# written by `vsearch demo` while it runs: . {shown(env)}\n"
                   f"export DEMO_URL={p.search.url}\n"
                   f"export EMBEDDER_URL={p.embedder.url}\n"
                   f"export VSEARCH_KAFKA_BOOTSTRAP={p.broker.bootstrap}\n"
                   f"export DEMO_QUERY={query}\n")
    vs, rel = vsearch_command(), shown(query)
    print(f"\n  Visual search is up:  {p.search.url}/\n"
          f"  API docs:             {p.search.url}/docs\n"
          f"  embedder (KServe):    {p.embedder.url}/v2/models/embedder  (V2 infer, V1 predict)\n"
          f"  Kafka broker:         {p.broker.bootstrap}\n"
          f"  a query image:        {rel}\n"
          f"  search with it:       curl -s -F image=@{rel} -F k=3 {p.search.url}/search\n"
          f"  click-through rate:   {vs} ctr --bootstrap {p.broker.bootstrap}\n"
          f"  logs:                 {shown(data / 'logs')}\n"
          f"  all of the above for another shell: . {shown(env)}\n\nPress Ctrl-C to stop.",
          flush=True)


def watch(p: Platform) -> int:
    """Until Ctrl-C (0), or until a process stops by itself (1)."""
    while True:
        for svc in p.started:
            if not svc.alive():
                print(f"{svc.name} stopped unexpectedly:\n{svc.log_tail()}", file=sys.stderr)
                return 1
        time.sleep(1.0)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(*, model_dir: str | None = None, catalog: str | None = None, data_dir: str = ".demo",
             port: int = 8000, timeout: float = 300.0, check: bool = False, rollout: str | None = None,
             golden: str | None = None, experiment: str | None = None, simulate_users: int = 0,
             loop: bool = False, train_steps: int = 30) -> int:
    plan = check_arguments(model_dir=model_dir, catalog=catalog, data_dir=data_dir, port=port,
                           rollout=rollout, golden=golden, experiment=experiment, simulate_users=simulate_users,
                           loop=loop, train_steps=train_steps)
    data = plan.data
    (data / "logs").mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # `kill -USR1 <pid>` prints every thread's stack to stderr (where a demo that does not stop
    # is stuck); Ctrl-C must work even if whatever started the demo ignored SIGINT
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = None
    started = time.monotonic()
    try:
        p = prepare(plan)
        start_platform(p, data, plan.port or free_port())
        publish_catalog(p, data)
        print("waiting until the catalog is searchable ...", flush=True)
        t0 = time.monotonic()
        n = wait_searchable(p.search.url, p.items, timeout, services=p.started)
        print(f"{n} public images searchable after {time.monotonic() - t0:.1f}s")
        if plan.loop:
            from .demo_loop import run_loop
            rc = run_loop(p, plan, check=check, serve_s=time.monotonic() - started, roll_out=roll_out)
            if check:
                return rc
        elif plan.rollout:
            rc = roll_out(p, plan, check=check)
            if check:
                return rc
        if check:
            return _check(p.search.url, p.broker.bootstrap, p.items)
        report(p, data)
        return watch(p)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not cut the clean-up short
        if p is not None:
            p.stop()
        (data / "demo.env").unlink(missing_ok=True)      # its URLs die with the processes
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)


def _check(url: str, bootstrap: str, items: list[dict]) -> int:
    """One query end to end: a crop of a catalog photo, a click on a result, and both events
    read back from search.events."""
    probe = query_image(items)
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
