"""Blue-green rollout benchmark: ``python -m bench.rollout [--items 20000] [--queries 200]``.

A catalog of unique generated JPEGs (every item is re-embedded: nothing precomputed, no two
images alike) is published to a real Tansu broker and served by v1 (a tiny ResNet, 16-d) from a
``milvus-lite server``; then v2 (a tiny ViT, 32-d) is rolled out through the operator's own
rollout logic on local processes (``vsearch.local.workloads``) while a search loop runs.

Reports: reindex throughput (candidate items / time from the backfill's start until its count
reached the serving count) against the candidate embedder's own throughput measured in the same
run (one client, batches of 64, over HTTP like the consumer); time from the spec change to
Ready; search p50/p99 before vs during the rollout; failed and mixed queries."""

from __future__ import annotations

import argparse
import io
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from vsearch.core.kafka import ensure_topics, send_and_confirm
from vsearch.core.store import DEFAULT_ALIAS, MilvusStore
from vsearch.ingest.events import encode, encode_key, upsert_event
from vsearch.local import services
from vsearch.local.demo_rollout import rollout_spec
from vsearch.local.samples import TINY
from vsearch.local.workloads import LocalRollout, LocalWorkloads
from vsearch.operators.rollout import READY
from vsearch.operators.trust import Trust
from vsearch.predictor.client import EmbedderClient
from vsearch.predictor.zoo import init_model_dir


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:72, 0:72]
    for i in range(n):
        p = folder / f"i{i:06d}.jpg"
        if not p.exists():
            f = rng.uniform(4, 30, 3)
            base = np.stack([127 + 100 * np.sin(xx / f[c] + i % 7 + c) * np.cos(yy / f[(c + 1) % 3]) for c in range(3)], -1)
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=85)
            p.write_bytes(buf.getvalue())
        out.append(p)
    return out


def pct(v, q):
    return float(np.percentile(v, q)) if v else float("nan")


class Loop:
    def __init__(self, url, items, threads=2):
        self.url, self.items = url, items
        self.lat, self.failed, self.mixed, self.n = [], 0, 0, 0
        self.stop_evt = threading.Event()
        self.lock = threading.Lock()
        self.ts = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(threads)]

    def run(self, k):
        http = requests.Session()
        i = k
        while not self.stop_evt.is_set():
            item_id, data = self.items[i % len(self.items)]
            i += 7
            t0 = time.perf_counter()
            try:
                r = http.post(f"{self.url}/search", files={"image": ("q.jpg", data)}, data={"k": "3"}, timeout=30)
                ok = r.status_code == 200
                body = r.json() if ok else {}
            except requests.RequestException:
                ok, body = False, {}
            dt = (time.perf_counter() - t0) * 1000
            with self.lock:
                self.n += 1
                if not ok:
                    self.failed += 1
                    continue
                self.lat.append(dt)
                top = (body.get("results") or [{}])[0]
                if body.get("collection") != f"images__{body.get('model_version')}" or top.get("id") != item_id \
                        or top.get("score", 0) < 0.999:
                    self.mixed += 1

    def start(self):
        for t in self.ts:
            t.start()
        return self

    def stop(self):
        self.stop_evt.set()
        for t in self.ts:
            t.join(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--data-dir", default=".bench/rollout")
    ap.add_argument("--candidate", default="tiny-vit", choices=("tiny-vit", "resnet-tiny"),
                    help="v2: a tiny ViT (32-d, 64 px) or resnet-tiny (the first default model's "
                         "backbone, random init, 256-d, 128 px)")
    ap.add_argument("--search-threads", type=int, default=2, help="search loop threads during the rollout")
    ap.add_argument("--idle-seconds", type=float, default=15.0,
                    help="backfill idle time (above a consumer-group rebalance pause: Tansu's session timeout is 6 s)")
    args = ap.parse_args(argv)



    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)              # stop every process it started
    root = Path(args.data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root))
    v1, v2 = work / "v1", work / "v2"
    init_model_dir("resnet18", v1, name="bench", version="1", **TINY["resnet18"])
    if args.candidate == "tiny-vit":
        init_model_dir("vit-small", v2, name="bench", version="2", **TINY["vit-small"])
    else:
        init_model_dir("resnet-tiny", v2, name="bench", version="2")
    print(f"generating {args.items} unique images ...", flush=True)
    paths = make_images(root / "images", args.items)
    started = []
    try:
        broker = services.start_broker(log_path=work / "broker.log")
        started.append(broker)
        milvus = services.start_milvus_lite_server(work / "milvus", log_path=work / "milvus.log")
        started.append(milvus)
        ensure_topics(broker.bootstrap, {"catalog.images": 2}, compact={"catalog.images"})
        recs = [(encode_key(f"i{n}"), encode(upsert_event(f"i{n}", uri=p.as_uri(), ts=1_700_000_000_000 + n)))
                for n, p in enumerate(paths)]
        send_and_confirm(broker.bootstrap, "catalog.images", recs)
        spec = rollout_spec(bootstrap=broker.bootstrap, milvus_uri=milvus.uri, alias=DEFAULT_ALIAS, name="bench",
                            version="1", uri=str(v1), idle_s=args.idle_seconds,
                            sample=50)
        # the benchmark's models are random-initialised (no offline verdict): it measures the mechanics
        spec["rollout"]["gate"]["requireOfflineVerdict"] = False
        workloads = LocalWorkloads(work / "logs", ingest_extra=("--batch-ms", "200", "--file-roots", str(root)))
        started.append(workloads)
        ro = LocalRollout(spec, workloads, printer=lambda m: print(m, flush=True),
                          trust=Trust(milvus_hosts=("127.0.0.1",), catalog_file_roots=(str(root),)))
        t0 = time.monotonic()
        ro.run_until(lambda s: s.get("phase") == READY, 3600)
        print(f"v1 serving after {time.monotonic() - t0:.0f}s", flush=True)

        search = services.start_search(
            "--embedder-url", ro.status["serving"]["embedderUrl"], "--milvus-uri", milvus.uri,
            "--query-store", "", "--dedup-distance", "0", "--allowed-embedder-urls", "http://127.0.0.1:*",
            log_path=work / "search.log")
        started.append(search)
        probe = [(f"i{n}", paths[n].read_bytes()) for n in range(0, args.items, max(1, args.items // 200))]
        warm = Loop(search.url, probe, threads=1).start()
        while warm.n < 10:
            time.sleep(0.05)
        warm.stop()
        before = Loop(search.url, probe, threads=1)
        before.start()
        while before.n < args.queries:
            time.sleep(0.1)
        before.stop()

        # the candidate embedder's own throughput, same machine, same run
        emb = services.start_embedder(v2, log_path=work / "embedder-alone.log", extra=("--threads", "1"))
        # (the rollout's embedder runs with --threads 1 too: LocalWorkloads' default)
        # measured one request at a time and with two in flight (as the consumer sends them);
        # the faster of the two is the baseline
        sample = [p.read_bytes() for p in paths[:min(2048, args.items)]]
        alone_by = {}
        for in_flight in (1, 2):
            client = EmbedderClient(emb.url, timeout=120, in_flight=in_flight)
            client.embed_bytes(sample[:64])
            t = time.perf_counter()
            for s in range(0, len(sample), 64):
                client.embed_bytes(sample[s:s + 64])
            alone_by[in_flight] = len(sample) / (time.perf_counter() - t)
            client.close()
        alone = max(alone_by.values())
        print(f"candidate embedder alone: {alone_by[1]:.1f} img/s one request at a time, "
              f"{alone_by[2]:.1f} with two in flight", flush=True)
        emb.stop()

        loop = Loop(search.url, probe, threads=args.search_threads).start()
        marks = {}

        def tick(out):
            c = out.status.get("candidate") or {}
            p = c.get("progress") or {}
            if out.phase == "Backfilling" and "backfill" not in marks:
                marks["backfill"] = time.monotonic()
            if "backfill" in marks and "first" not in marks and p.get("indexed"):
                marks["first"], marks["first_n"] = time.monotonic(), p["indexed"]
            if "backfill" in marks and "caught_up" not in marks and p.get("servingCount") and \
                    p.get("indexed", 0) >= p["servingCount"]:
                marks["caught_up"] = time.monotonic()

        ro.set_model("bench", "2", str(v2))
        t_change = time.monotonic()
        ro.run_until(lambda s: s.get("phase") == READY and (s.get("serving") or {}).get("version") == "2",
                     7200, poll=0.2, on_tick=tick)
        t_ready = time.monotonic() - t_change
        time.sleep(2)
        loop.stop()
        with MilvusStore(milvus.uri) as store:
            n2 = store.count(store.describe_alias("images"))      # the served collection (its name has a suffix)
        reindex = n2 / (marks["caught_up"] - marks["backfill"])
        steady = (n2 - marks["first_n"]) / max(1e-6, marks["caught_up"] - marks["first"])
        print()
        print("| measurement | result | baseline (same run) | ratio |")
        print("| --- | --- | --- | --- |")
        what = "tiny ViT 32-d, 64 px" if args.candidate == "tiny-vit" else "resnet-tiny 256-d, 128 px"
        print(f"| reindex throughput ({n2} items, {what}), backfill start -> caught up | {reindex:.1f} items/s | "
              f"candidate embedder alone {alone:.1f} img/s | {reindex / alone:.2f} |")
        print(f"| reindex throughput once the consumer runs (first item -> caught up) | {steady:.1f} items/s | "
              f"candidate embedder alone {alone:.1f} img/s | {steady / alone:.2f} |")
        print(f"| spec change -> Ready | {t_ready:.1f} s | | |")
        print(f"| search p50 / p99 before the rollout | {pct(before.lat, 50):.1f} / {pct(before.lat, 99):.1f} ms "
              f"({len(before.lat)} queries) | | |")
        print(f"| search p50 / p99 during the rollout | {pct(loop.lat, 50):.1f} / {pct(loop.lat, 99):.1f} ms "
              f"({loop.n} queries) | | |")
        print(f"| failed / mixed queries during the rollout and switch | {loop.failed} / {loop.mixed} | goal 0 / 0 | |")
        return 0 if loop.failed == 0 and loop.mixed == 0 else 1
    finally:
        for s in reversed(started):
            (s.close if hasattr(s, "close") else s.stop)()


if __name__ == "__main__":
    raise SystemExit(main())
