"""The search API under concurrent load, next to its two parts alone under the same load.

On the Milvus 2.3.5 standalone server (the test extras' ``milvus`` package) with a catalog of
``--size`` vectors (the default model's real Caltech embeddings blended and noised, as in
:mod:`bench.index`; HNSW M=16 efConstruction=200, ef=64: the platform's settings), for each
concurrency in ``--concurrency`` (clients sending one request after the other, each on its own
connection, real Caltech photos):

- embedder alone:  ``vsearch serve embedder`` (models/default), one photo per V2 request;
- Milvus alone:    ``MilvusStore.search`` of the photos' vectors with exactly what the search
                   service asks for (limit ``k * overfetch + 10`` = 40 for k=10, the visibility
                   filter, uri/metadata/visibility/embedding back);
- search:          ``vsearch serve search --embedder-url`` (the chart's layout), multipart
                   ``POST /search`` k=10: p50/p99/QPS and the ratio of its QPS to the slower of
                   the two parts alone (goal >= 0.8), and the time per stage from its own
                   ``/metrics`` (``vsearch_search_seconds``: embed, ann, rerank; HTTP = the
                   client's latency minus the stages);
- search in process: ``vsearch serve search --model-dir`` (embedding in the search process).

``--variants`` runs the search service once per variant in the same run (the settings the
fixes can be switched off with, for before/after):  ``default`` and ``before``
(``--search-threads 0 --embed-batch 1``: KServe's default thread pool and one forward per query),
and ``nodedup`` (``--dedup-distance 0``: no near-duplicate re-rank, so no stored vectors fetched).

    python -m bench.load [--size 100000] [--concurrency 1,4,16] [--requests 200]
                         [--variants before,default] [--modes remote,inprocess]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.index import caltech_embeddings, catalog, ms
from vsearch.core.store import IndexConfig, MilvusStore
from vsearch.local.samples import caltech_files
from vsearch.local.services import start_embedder, start_milvus_standalone, start_search
from vsearch.predictor.model_dir import default_model_dir, read_meta

ALIAS = "bench_load"
K = 10
VARIANTS = {"default": (), "before": ("--search-threads", "0", "--embed-batch", "1"),
            "nodedup": ("--dedup-distance", "0")}     # no stored vectors asked of Milvus


def load_catalog(uri: str, model_dir: Path, n: int) -> str:
    """A collection of ``n`` rows built by the default model (its record), behind ALIAS."""
    from pymilvus import Collection, connections

    meta = read_meta(model_dir)
    real = caltech_embeddings(model_dir)["emb"]
    store = MilvusStore(uri, timeout=1800, index=IndexConfig("HNSW"))
    name = f"bench_load_{n}"
    if store.has_collection(name) and store.count(name) == n:
        store.switch_alias(ALIAS, name)
        return name
    t0 = time.perf_counter()
    store.ensure_model_collection(name, meta.embedding_dim, {"model": meta.name, "version": meta.version,
                                                             "embedder_url": ""})
    x = catalog(real, n)
    connections.connect(alias="bench-load", uri=uri)
    coll = Collection(name, using="bench-load")
    for s in range(0, n, 10_000):
        e = min(n, s + 10_000)
        coll.insert([[f"v{i}" for i in range(s, e)], x[s:e], [f"file:///catalog/{i}.jpg" for i in range(s, e)],
                     [{"label": "x"}] * (e - s), ["public"] * (e - s), [0] * (e - s)])
    store.flush(name)
    while True:
        info = store.client.describe_index(name, "embedding")
        if int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0:
            break
        time.sleep(1)
    store.switch_alias(ALIAS, name)
    print(f"  catalog: {n:,} rows inserted and indexed in {time.perf_counter() - t0:.0f}s", flush=True)
    store.close()
    return name


def run_load(make_client, call, items: list, concurrency: int, total: int) -> dict:
    """``concurrency`` clients, each with its own ``make_client()``, send ``total`` calls in all
    (one after the other per client): latencies, QPS."""
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client():
        c = make_client()
        mine = []
        for i in range(3):                                 # warm-up: connections open
            call(c, items[i % len(items)])
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t = time.perf_counter()
            call(c, items[i % len(items)])
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    barrier = threading.Barrier(concurrency + 1)
    with futures.ThreadPoolExecutor(concurrency) as pool:
        jobs = [pool.submit(client) for _ in range(concurrency)]
        barrier.wait()
        t0 = time.perf_counter()
        for j in jobs:
            j.result()
        wall = time.perf_counter() - t0
    return {"p50": ms(lat, 50), "p99": ms(lat, 99), "qps": len(lat) / wall, "n": len(lat)}


def cpu_seconds(pids: list[int], pgid: int | None = None) -> float:
    """CPU time (user + system) of these processes, and of every process in ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    found = set(pids)
    if pgid is not None:
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.getpgid(int(p)) == pgid:
                        found.add(int(p))
                except OSError:
                    pass
    total = 0.0
    for pid in found:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def stage_sums(url: str) -> dict[str, tuple[float, float]]:
    """``{stage: (sum seconds, count)}`` of the search service's ``vsearch_search_seconds``."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^vsearch_search_seconds_(sum|count)\{stage="(\w+)"\} ([0-9.e+-]+)$', text, re.M):
        kind, stage, v = m.groups()
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(v)
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="catalog rows")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=200, help="requests per measurement")
    ap.add_argument("--variants", default="before,default", help=f"search-service variants: {', '.join(VARIANTS)}")
    ap.add_argument("--modes", default="remote,inprocess", help="remote (--embedder-url), inprocess (--model-dir)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the embedder and in-process search")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the servers on a kill too
    concs = [int(c) for c in args.concurrency.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    model_dir = default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    photos = [f.read_bytes() for f in caltech_files(64, 37)]
    print(f"catalog {args.size:,}; concurrency {concs}; {args.requests} requests each; {len(photos)} photos; "
          f"cpus {os.cpu_count()}; work dir {work}", flush=True)
    rows = []
    milvus = embedder = None
    try:
        milvus = start_milvus_standalone(work / "milvus", log_path=work / "milvus.log", timeout=900)
        coll = load_catalog(milvus.uri, model_dir, args.size)
        embedder = start_embedder(model_dir, log_path=work / "embedder.log",
                                  extra=("--threads", str(args.threads)), timeout=300)
        from vsearch.predictor.client import EmbedderClient
        vectors = EmbedderClient(embedder.url).embed_bytes(photos)

        def embed_call(c, img):
            c.embed_bytes([img])

        def milvus_call(store, v):
            store.search(coll, v, k=40, filter='visibility != "private"',
                         output_fields=("uri", "metadata", "visibility", "embedding"))

        alone = {}
        mpg = os.getpgid(milvus.proc.pid)
        for conc in concs:
            c0 = cpu_seconds([embedder.proc.pid])
            e = run_load(lambda: EmbedderClient(embedder.url), embed_call, photos, conc, args.requests)
            e["stages"] = f"CPU ms/request: embedder {(cpu_seconds([embedder.proc.pid]) - c0) * 1000 / e['n']:.1f}"
            c0 = cpu_seconds([], mpg)
            m = run_load(lambda: MilvusStore(milvus.uri, timeout=60, index=IndexConfig("HNSW")), milvus_call,
                         list(vectors), conc, args.requests)
            m["stages"] = f"CPU ms/request: milvus {(cpu_seconds([], mpg) - c0) * 1000 / m['n']:.1f}"
            alone[conc] = (e, m)
            for label, r in (("embedder alone (V2, 1 photo)", e), ("Milvus alone (HNSW ef=64, limit 40)", m)):
                rows.append({"what": label, "conc": conc, **r})
                print(f"  {label} @{conc}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['qps']:.1f}/s; "
                      f"{r['stages']}", flush=True)

        def cpus(svc) -> dict[str, float]:
            return {"search": cpu_seconds([svc.proc.pid]), "embedder": cpu_seconds([embedder.proc.pid]),
                    "milvus": cpu_seconds([], mpg), "clients": cpu_seconds([os.getpid()])}

        def search_call(session_url, img):
            s, url = session_url
            r = s.post(f"{url}/search", files={"image": ("q.jpg", img, "image/jpeg")}, data={"k": str(K)},
                       timeout=60)
            r.raise_for_status()

        for mode in modes:
            for variant in variants:
                where = ("--embedder-url", embedder.url) if mode == "remote" else ("--model-dir", str(model_dir),
                                                                                   "--threads", str(args.threads))
                svc = start_search(*where, "--milvus-uri", milvus.uri, "--alias", ALIAS, "--query-store", "",
                                   *VARIANTS[variant], log_path=work / f"search-{mode}-{variant}.log", timeout=300)
                try:
                    for conc in concs:
                        before = stage_sums(svc.url)
                        cpu0 = cpus(svc)
                        r = run_load(lambda url=svc.url: (requests.Session(), url), search_call, photos, conc, args.requests)
                        cpu1 = cpus(svc)
                        after = stage_sums(svc.url)
                        cpu = {k: (cpu1[k] - cpu0[k]) * 1000 / r["n"] for k in cpu0}
                        split = {st: (after[st][0] - before.get(st, (0, 0))[0]) /
                                 max(1.0, after[st][1] - before.get(st, (0, 0))[1]) * 1000 for st in after}
                        e, m = alone[conc]
                        slower = min(e["qps"], m["qps"])
                        stages = (" ".join(f"{k} {v:.1f}" for k, v in split.items()) + "; CPU ms/request: " +
                                  " ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
                        rows.append({"what": f"search ({mode} embedder, {variant})", "conc": conc, **r,
                                     "ratio": r["qps"] / slower, "stages": stages})
                        print(f"  search {mode}/{variant} @{conc}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
                              f"{r['qps']:.1f}/s = {r['qps'] / slower:.2f} of the slower part; stages ms: {stages}",
                              flush=True)
                finally:
                    svc.stop()
    finally:
        for s in (embedder, milvus):
            if s is not None:
                s.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n| {args.size:,} vectors, Milvus 2.3.5 standalone | clients | p50 ms | p99 ms | QPS | "
          "QPS / slower part alone | server stages, mean ms; CPU ms per request by process |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in sorted(rows, key=lambda r: (r["conc"], r["what"])):
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        print(f"| {r['what']} | {r['conc']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['qps']:.1f} | {ratio} | "
              f"{r.get('stages', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
