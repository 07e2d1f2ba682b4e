"""Memory, recall and speed per index type and embedding size, on the default model's embeddings.

Data (what the figures are measured on):

- the real embeddings of every Caltech-101 photo in ``../shared/data/caltech101`` (3,487) by
  ``models/default`` (the served network, whitening included), computed once and cached in
  ``.bench/caltech-<model>-<n>.npz``;
- a catalog of ``--sizes`` vectors generated from them: each one ``(1 - w) a + w b + s e``
  renormalised, with ``a`` and ``b`` two real embeddings drawn at random, ``w ~ U(0, 0.5)``
  (a blend of two photos), ``e`` isotropic Gaussian noise of norm about ``s`` = 0.35 (seeded);
- queries: ``--queries`` real embeddings (unmodified photos), ground truth: exact top-10 by
  inner product (numpy) over the whole catalog.

Rows (one per index and search setting):

- Milvus 2.3.5 standalone (the ``milvus`` package of the test extras): one collection per index,
  the platform's schema (``vsearch.core.store``), COSINE; HNSW, IVF_FLAT, IVF_SQ8, IVF_PQ
  (a sweep of ``m``/``nbits``, ``--pq``), SCANN, DISKANN (each tried; a refusal is printed).
  Bytes per vector: the server is restarted on its data directory before each measurement, loads
  a small warm-up collection (what the first load of anything initialises once), and the
  resident memory (VmRSS) of its processes with the collection loaded minus before, divided by
  the rows, is the figure: the whole collection (index + the scalar fields it loads); release +
  load again gives a second figure (printed). The formula value of the index alone is printed
  beside it. Build time: ``create_index`` to every row indexed (``--build-cap`` gives up).
  p50/p99/QPS at 1 client and at 8 concurrent clients (own connections).
- FAISS in process, the reference: ``Flat`` (exact), ``HNSW32``, ``IVF,SQ8``, ``IVF,PQ`` and
  ``OPQ,IVF,PQ`` each searched as is and with a re-rank of the top ``--rerank`` candidates on the
  full vectors (read from a memory map: they stay on disk); bytes per vector = the serialized
  index / rows (codes + ids + lists), and the process' RSS growth over the build (printed; glibc
  reuses what an earlier index freed, so it can read low). One thread for OpenMP and BLAS (the
  8 clients are threads of their own; with faiss' default two OpenMP threads its PQ training on
  this loaded machine ran 30x slower).
- Embedding size: the vectors cut to 256/128/64 dimensions. The whitening is a PCA (its
  columns are the eigenvectors, stored by increasing eigenvalue), so the cut keeps the
  components of largest variance: the columns of ``whitening.safetensors`` ordered by their
  eigenvalue (read from the file), then renormalised. mAP@R on the Caltech held-out split (the
  trainer's split and metric code: ``trainer.data.select_split``, ``trainer.metrics``), and
  Milvus HNSW at that size: measured bytes per vector and recall@10.

    python -m bench.index [--sizes 100000] [--queries 200] [--quick] [--skip-dims] [--only HNSW,IVF_SQ8]
    python -m bench.index --plot-from .bench/a.json,.bench/b.json --plot-path docs/index-cost.png

Prints one table (markdown), writes the rows as JSON (``--out``) and the plot (``--plot-path``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vsearch.core.store import GRPC_OPTIONS, MilvusStore
from vsearch.local.samples import CALTECH
from vsearch.local.services import ProcessGroupService, free_port, milvus_ready, port_open
from vsearch.predictor.model_dir import default_model_dir, read_meta

BENCH_DIR = Path(".bench")
K = 10


# --------------------------------------------------------------------------- data

def caltech_embeddings(model_dir: Path, data: Path = CALTECH) -> dict:
    """{"emb" [N, D], "labels" [N], "sources" [N], "held" [N] bool}: every labelled Caltech
    photo embedded by the served network (cached)."""
    from vsearch.predictor.inference import Embedder
    from vsearch.trainer.data import list_images, select_split

    meta = read_meta(model_dir)
    records = [r for r in list_images(data) if r.label is not None]
    cache = BENCH_DIR / f"caltech-{meta.model_id}-{len(records)}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    held = {r.source for r in select_split(records, "held-out", 0.3, 0)}
    emb = Embedder(model_dir, batch_size=64)
    vecs, keep = [], []
    t0 = time.perf_counter()
    for i in range(0, len(records), 64):
        chunk = records[i:i + 64]
        for r, v in zip(chunk, emb.embed_each([Path(r.source).read_bytes() for r in chunk])):
            if isinstance(v, np.ndarray):
                vecs.append(v)
                keep.append(r)
    emb.close()
    print(f"  embedded {len(keep)} Caltech photos in {time.perf_counter() - t0:.0f}s (cached in {cache})")
    out = {"emb": np.stack(vecs).astype(np.float32), "labels": np.array([r.label for r in keep]),
           "sources": np.array([r.source for r in keep]), "held": np.array([r.source in held for r in keep])}
    BENCH_DIR.mkdir(exist_ok=True)
    np.savez(cache, **out)
    return out


def component_order(model_dir: Path) -> np.ndarray:
    """The whitened dimensions by decreasing variance (PCA eigenvalue): proj = eigvec /
    sqrt(eigenvalue), so a column's squared norm is 1 / eigenvalue."""
    from safetensors.numpy import load_file

    proj = load_file(str(model_dir / "whitening.safetensors"))["proj"]
    return np.argsort((proj.astype(np.float64) ** 2).sum(axis=0))


def cut(x: np.ndarray, order: np.ndarray, d: int) -> np.ndarray:
    y = np.ascontiguousarray(x[:, order[:d]])
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def catalog(real: np.ndarray, n: int, seed: int = 1, noise: float = 0.35) -> np.ndarray:
    """Blends of two real embeddings plus noise, renormalised (see the module docstring)."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        a, b = real[rng.integers(0, len(real), m)], real[rng.integers(0, len(real), m)]
        w = rng.uniform(0, 0.5, (m, 1)).astype(np.float32)
        x = (1 - w) * a + w * b + (noise / math.sqrt(d)) * rng.normal(size=(m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    out = []
    for i in range(0, len(q), 64):
        s = q[i:i + 64] @ x.T
        idx = np.argpartition(-s, k, axis=1)[:, :k]
        out.append(np.take_along_axis(idx, np.argsort(-np.take_along_axis(s, idx, 1), 1), 1))
    return np.concatenate(out)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def load_avg() -> str:
    """The machine's 1-minute load average (it is shared: printed beside every figure)."""
    return f"{os.getloadavg()[0]:.1f}"


def save_rows(path: str, rows: list[dict], dim_rows: list[dict]) -> None:
    import json
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"rows": rows, "dims": dim_rows}, indent=1, default=float))


def ms(values, p) -> float:
    return float(np.percentile(np.asarray(values) * 1000, p))


# --------------------------------------------------------------------------- Milvus

def group_rss(pgid: int) -> int:
    """Resident bytes of every process in the server's process group."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def steady_rss(pgid: int, wait: float = 3.0, limit: float = 40.0) -> int:
    """RSS once it has stopped moving (under 1 MiB in 3 s), at most ``limit`` seconds."""
    time.sleep(wait)
    t_end = time.monotonic() + limit
    last = group_rss(pgid)
    while time.monotonic() < t_end:
        time.sleep(3)
        now = group_rss(pgid)
        if abs(now - last) < 1 << 20:
            return now
        last = now
    return last


def index_formula(kind: str, params: dict, d: int) -> float:
    """Bytes per vector of the index structure alone, from its definition (for comparison)."""
    if kind in ("FLAT", "IVF_FLAT"):
        return 4 * d + 8
    if kind == "HNSW":
        return 4 * d + 2 * params["M"] * 4 * 1.05 + 8       # vectors + level-0 links (+ upper levels)
    if kind == "IVF_SQ8":
        return d + 8
    if kind == "IVF_PQ":
        return params["m"] * params["nbits"] / 8 + 8
    if kind == "SCANN":
        return d / 2 + 4 * d + 8                             # 4-bit fast-scan codes + raw data for re-ordering
    return float("nan")


# The server's C++ side allocates with glibc malloc, which keeps freed memory for reuse and
# raises its mmap threshold after large frees: a fixed threshold makes every large block (index
# data, loaded columns) its own mapping, returned on free, so that RSS deltas measure what a
# load holds. (Set for the server process only; it does not change what is allocated.)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "4"}


class BuildTimeout(RuntimeError):
    pass


class MilvusBench:
    """One Milvus standalone server on fixed ports, restartable on its data directory: each
    index is measured on a freshly started server (``measure``), so that what earlier inserts,
    builds and loads left in its heaps does not blur the difference a load makes."""

    def __init__(self, workdir: Path, mmap_threshold: int | None = None, server_env: dict | None = None,
                 server_config: dict | None = None):
        self.config = server_config or {}
        self.env = {**MALLOC_ENV, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}),
                    **(server_env or {})}
        self.data_dir = (workdir / "milvus").resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "milvus.log"
        self.port, self.etcd_client, self.etcd_peer = free_port(), free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        # start_milvus_standalone's server, on the same ports at every restart (the embedded
        # etcd keeps its member's peer address in its data directory)
        etcd_conf = self.data_dir / "embed-etcd.yaml"
        etcd_conf.write_text(
            f"listen-client-urls: http://127.0.0.1:{self.etcd_client}\n"
            f"advertise-client-urls: http://127.0.0.1:{self.etcd_client}\n"
            f"listen-peer-urls: http://127.0.0.1:{self.etcd_peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{self.etcd_peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{self.etcd_peer}\n"
            "quota-backend-bytes: 4294967296\nauto-compaction-mode: revision\n"
            "auto-compaction-retention: '1000'\n")
        self.server = ProcessGroupService(
            "milvus-standalone",
            [sys.executable, "-c", "import sys, milvus; milvus.main()", "--data", str(self.data_dir),
             "--proxy-port", str(self.port), "--etcd-port", str(self.etcd_client),
             *[a for k, v in self.config.items() for a in ("--extra-config", f"{k}={v}")]],
            port=self.port, ready=lambda: port_open(self.port) and milvus_ready(self.uri),
            log_path=self.log_path, cwd=str(self.data_dir),
            env={"ETCD_CONFIG_PATH": str(etcd_conf), "ETCD_USE_EMBED": "true", **self.env}).wait_ready(900)
        self.pgid = os.getpgid(self.server.proc.pid)
        self.store = MilvusStore(self.uri, timeout=1800)

    def restart(self) -> float:
        t0 = time.perf_counter()
        self.store.close()
        self.server.stop(timeout=60)
        self._start()
        self.restarts += 1
        return time.perf_counter() - t0

    def close(self):
        self.store.close()
        self.server.stop()

    def client(self):
        from pymilvus import MilvusClient
        return MilvusClient(uri=self.uri, timeout=600, grpc_options=GRPC_OPTIONS, dedicated=True)

    def insert(self, name: str, x: np.ndarray) -> float:
        """A fresh collection with the platform's schema holding ``x``; returns seconds."""
        from pymilvus import Collection, connections

        c = self.store.client
        if c.has_collection(name):
            c.drop_collection(name)
        c.create_collection(name, schema=self.store._schema(x.shape[1]), consistency_level="Bounded")
        alias = f"bench{self.restarts}"
        connections.connect(alias=alias, uri=self.uri)
        coll = Collection(name, using=alias)
        t0 = time.perf_counter()
        for s in range(0, len(x), 10_000):
            e = min(len(x), s + 10_000)
            coll.insert([[f"v{i}" for i in range(s, e)], x[s:e], [""] * (e - s), [{}] * (e - s),
                         ["public"] * (e - s), [0] * (e - s)])
        c.flush(name)
        connections.disconnect(alias)
        return time.perf_counter() - t0

    def build(self, name: str, n: int, kind: str, params: dict, cap: float = 3600) -> float:
        """(Re)builds the collection's vector index; returns seconds, BuildTimeout past ``cap``
        (the index is dropped and the server restarted, which ends the build)."""
        c = self.store.client
        c.release_collection(name)
        for idx in c.list_indexes(name):
            c.drop_index(name, idx)
        ip = c.prepare_index_params()
        ip.add_index(field_name="embedding", index_type=kind, metric_type="COSINE", params=params)
        t0 = time.perf_counter()
        seen = len(self.build_failures())
        c.create_index(name, ip, sync=False)        # (sync: pymilvus would wait, whatever the cap)
        for tick in itertools.count():
            info = c.describe_index(name, "embedding")
            if info.get("state") == "Failed" or info.get("index_state_fail_reason"):
                raise RuntimeError(f"index build failed: {info.get('index_state_fail_reason') or info}")
            failed = self.build_failures()[seen:] if tick % 10 == 0 else []
            if len(failed) >= 3:        # the server retries a failing build every few seconds, forever
                c.drop_index(name, "embedding")
                self.restart()
                raise RuntimeError(f"index build failed {len(failed)} times: {failed[-1]}")
            # (2.3.5 can report pending rows left over once the state is Finished)
            if int(info.get("indexed_rows", 0)) >= n and (int(info.get("pending_index_rows", 0)) == 0
                                                          or info.get("state") == "Finished"):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > cap:
                done = int(info.get("indexed_rows", 0))
                c.drop_index(name, "embedding")
                self.restart()
                raise BuildTimeout(f"{kind} not built after {cap:.0f} s ({done:,} of {n:,} rows indexed)")
            time.sleep(1)

    WARM = "bench_index_warm"

    def build_failures(self) -> list[str]:
        """The reasons of the failed index builds in the server's log, oldest first."""
        import re

        out = []
        for log in sorted((self.data_dir / "logs").glob("standalone-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "failed to build index" in line:
                    m = re.search(r'\[error="([^"]*)', line)
                    out.append((m.group(1) if m else line[-200:]).replace("\\n", " ").strip())
        return out

    def measure(self, name: str, n: int) -> dict:
        """Bytes per vector of the loaded collection: a freshly started server that has loaded
        a small collection first (2,000 rows, HNSW: what the first load of any collection
        initialises once, ~30-40 MB here, is not counted), its RSS steady, then the collection
        loaded (the delta is the measurement); and release + load again."""
        c = self.store.client
        if not c.has_collection(self.WARM):
            x = np.random.default_rng(9).normal(size=(2000, 8)).astype(np.float32)
            self.insert(self.WARM, x / np.linalg.norm(x, axis=1, keepdims=True))
            self.build(self.WARM, 2000, "HNSW", {"M": 16, "efConstruction": 64})
        restart_s = self.restart()
        c = self.store.client
        for attempt in range(8):
            # right after a restart the coordinator can still expect the previous run's query
            # node ("node not match") until its session expires: the load fails; wait, retry
            try:
                c.load_collection(self.WARM)
                base = steady_rss(self.pgid)
                t0 = time.perf_counter()
                c.load_collection(name)
                load_s = time.perf_counter() - t0
                break
            except Exception as exc:  # noqa: BLE001
                if attempt == 7:
                    raise
                print(f"  load failed after a restart ({str(exc)[:120]}): retrying in 15 s", flush=True)
                time.sleep(15)
        first = steady_rss(self.pgid)
        c.release_collection(name)
        released = steady_rss(self.pgid)
        c.load_collection(name)
        after = steady_rss(self.pgid)
        return {"restart_s": restart_s, "load_s": load_s, "bytes": (first - base) / n,
                "reload": (after - released) / n, "rss_before": base, "rss_after": first}

    def release(self, name: str) -> None:
        self.store.client.drop_collection(name)

    def search(self, name: str, queries: np.ndarray, truth: np.ndarray, sp: dict, clients: int = 8,
               passes: int = 2) -> dict:
        cli = self.client()

        def one(c, q):
            t = time.perf_counter()
            hits = c.search(name, data=[q.tolist()], limit=K, output_fields=[], anns_field="embedding",
                            search_params={"metric_type": "COSINE", "params": sp})[0]
            return time.perf_counter() - t, [int(h["id"][1:]) for h in hits]

        for q in queries[:20]:
            one(cli, q)
        single = [one(cli, q) for q in queries]
        out = {"recall": recall([f for _, f in single], truth), "p50_1": ms([t for t, _ in single], 50),
               "p99_1": ms([t for t, _ in single], 99), "qps_1": len(single) / sum(t for t, _ in single)}
        conns = [self.client() for _ in range(clients)]
        work = [(conns[i % clients], q) for i, q in enumerate(np.concatenate([queries] * passes))]
        with futures.ThreadPoolExecutor(clients) as pool:
            t0 = time.perf_counter()
            res = list(pool.map(lambda a: one(*a), work))
            wall = time.perf_counter() - t0
        out.update(p50_8=ms([t for t, _ in res], 50), p99_8=ms([t for t, _ in res], 99), qps_8=len(res) / wall)
        try:        # the search service asks for the stored vectors (its near-duplicate re-rank)
            hit = cli.search(name, data=[queries[0].tolist()], limit=1, output_fields=["embedding"],
                             anns_field="embedding", search_params={"metric_type": "COSINE", "params": sp})[0][0]
            out["vectors"] = "yes" if hit["entity"].get("embedding") is not None else "no"
        except Exception as exc:  # noqa: BLE001  (the server refuses: the index keeps no raw vectors)
            out["vectors"] = f"no ({str(exc)[:80]})"
        for c in [cli, *conns]:
            c.close()
        return out


# Index builds: (type, build params, [search params ...]); nlist scales with the catalog.
def milvus_configs(n: int, d: int, quick: bool, pq: str = "") -> list[tuple[str, dict, list[dict]]]:
    nlist = int(min(4096, max(64, 2 ** round(math.log2(4 * math.sqrt(n))))))
    probes = [{"nprobe": 16}, {"nprobe": 64}]
    cfgs = [("HNSW", {"M": 16, "efConstruction": 200}, [{"ef": 32}, {"ef": 64}, {"ef": 128}]),
            ("IVF_FLAT", {"nlist": nlist}, probes),
            ("IVF_SQ8", {"nlist": nlist}, probes)]
    sweep = [tuple(int(v) for v in s.split("x")) for s in pq.split(",") if s] if pq else \
        ([(48, 8)] if quick else [(48, 8), (96, 8), (24, 8), (96, 4)])
    for m, nbits in sweep:
        if d % m == 0:
            cfgs.append(("IVF_PQ", {"nlist": nlist, "m": m, "nbits": nbits}, [{"nprobe": 64}]))
    # with_raw_data as the string "true": pymilvus sends a Python True as "True", which this
    # server's knowhere refuses ("type conflict in json", the build retried every 3 s)
    cfgs += [("SCANN", {"nlist": nlist, "with_raw_data": "true"},
              [{"nprobe": 16, "reorder_k": 100}, {"nprobe": 64, "reorder_k": 100}]),
             ("DISKANN", {}, [{"search_list": 100}])]
    return cfgs


# --------------------------------------------------------------------------- FAISS

def faiss_rows(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, workdir: Path, rerank: int,
               quick: bool, pq: bool = True, only: list[str] = ()) -> list[dict]:
    import faiss

    n, d = x.shape
    full = np.lib.format.open_memmap(workdir / "full.npy", mode="w+", dtype=np.float32, shape=x.shape)
    full[:] = x
    full.flush()
    nlist = int(min(4096, max(64, 2 ** round(math.log2(4 * math.sqrt(n))))))
    rows = []
    # (label, factory string, [re-rank depths]): each index is built once, searched at each depth
    specs = [("Flat", "Flat", [0]), ("HNSW32,Flat", "HNSW32,Flat", [0]), (f"IVF{nlist},SQ8", f"IVF{nlist},SQ8", [0])]
    if pq:
        for m in ([48] if quick else [48, 96, 24]):
            specs.append((f"IVF{nlist},PQ{m}", f"IVF{nlist},PQ{m}", [0, rerank]))
        specs.append((f"OPQ48,IVF{nlist},PQ48", f"OPQ48,IVF{nlist},PQ48", [0, rerank]))
    if only:
        specs = [sp for sp in specs if any(o.lower() in sp[1].lower() for o in only)]
    train = x[np.random.default_rng(3).choice(n, min(n, 20_000), replace=False)]
    # One thread for OpenMP and for faiss' own (OpenMP) OpenBLAS: the queries run on their own
    # threads (8 clients), and with the default (2 threads) PQ training on this loaded 2-core
    # machine took 94 s on 20k vectors (OpenMP threads spinning against each other) against
    # 3 s with one thread.
    from threadpoolctl import threadpool_limits
    limits = threadpool_limits(1)
    faiss.omp_set_num_threads(1)
    for label, spec, depths in specs:
        rss0 = self_rss()
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(train)
        index.add(x)
        build_s = time.perf_counter() - t0
        rss_bytes = (self_rss() - rss0) / n
        nbytes = faiss.serialize_index(index).nbytes / n
        if "HNSW" in spec:
            faiss.downcast_index(index).hnsw.efSearch = 64
        if "IVF" in spec:
            faiss.extract_index_ivf(index).nprobe = 32
        for rr in depths:
            fetch = max(K, rr)

            def one(q, index=index, fetch=fetch, rr=rr):
                t = time.perf_counter()
                _, ids = index.search(q[None], fetch)
                ids = ids[0][ids[0] >= 0]
                if rr:
                    s = full[np.sort(ids)] @ q                  # re-rank on the full vectors (memory map)
                    ids = np.sort(ids)[np.argsort(-s)[:K]]
                return time.perf_counter() - t, ids[:K].tolist()

            for q in queries[:20]:
                one(q)
            single = [one(q) for q in queries]
            with futures.ThreadPoolExecutor(8, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
                t0 = time.perf_counter()
                res = list(pool.map(one, np.concatenate([queries] * 2)))
                wall = time.perf_counter() - t0
            rows.append({"engine": "FAISS in process", "index": label, "load": load_avg(),
                         "search": ("nprobe=32" if "IVF" in spec else "efSearch=64" if "HNSW" in spec else "exact")
                         + (f", re-rank top {rr}" if rr else ""),
                         "bytes": nbytes, "rss_bytes": rss_bytes, "formula": float("nan"), "build_s": build_s,
                         "recall": recall([f for _, f in single], truth),
                         "p50_1": ms([t for t, _ in single], 50), "p99_1": ms([t for t, _ in single], 99),
                         "qps_1": len(single) / sum(t for t, _ in single), "p50_8": ms([t for t, _ in res], 50),
                         "p99_8": ms([t for t, _ in res], 99), "qps_8": len(res) / wall,
                         "note": "codes in memory, full vectors on disk (mmap) for the re-rank" if rr else ""})
            print(f"  faiss {label} {rows[-1]['search']}: {nbytes:.0f} B/vector serialized, {rss_bytes:.0f} RSS, "
                  f"build {build_s:.1f}s, recall@10 {rows[-1]['recall']:.3f}, p50 {rows[-1]['p50_1']:.2f} ms, "
                  f"p99 {rows[-1]['p99_1']:.2f} ms, QPS {rows[-1]['qps_1']:.0f} / {rows[-1]['qps_8']:.0f} @8 "
                  f"(load {load_avg()})", flush=True)
        del index
    limits.restore_original_limits()
    return rows


def self_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- main

def fmt(v, spec=".0f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print("\n| n | engine | index (build) | search | bytes/vector measured | index formula | build s | "
          "recall@10 | p50 / p99 ms, 1 client | QPS 1 client | p50 / p99 ms, 8 | QPS 8 | vectors back | load |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        if r.get("error"):
            print(f"| {r['n']:,} | {r['engine']} | {r['index']} | not built: {r['error'][:160]} | - | - | - | - | - "
                  f"| - | - | - | - | {r.get('load', '-')} |")
            continue
        print(f"| {r['n']:,} | {r['engine']} | {r['index']} | {r['search']} | {fmt(r['bytes'])} | "
              f"{fmt(r['formula'])} | {fmt(r['build_s'], '.1f')} | {fmt(r['recall'], '.3f')} | "
              f"{fmt(r['p50_1'], '.2f')} / {fmt(r['p99_1'], '.1f')} | {fmt(r['qps_1'], '.0f')} | "
              f"{fmt(r['p50_8'], '.2f')} / {fmt(r['p99_8'], '.1f')} | {fmt(r['qps_8'], '.0f')} | "
              f"{r.get('vectors', '-')} | {r.get('load', '-')} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("error") and r.get("bytes") and r["bytes"] > 0 and r.get("recall") is not None:
            groups.setdefault(f"{r['engine']}: {r['index'].split(' ')[0]}", []).append(r)
    for label, rs in sorted(groups.items()):
        ax.plot([r["bytes"] for r in rs], [r["recall"] for r in rs], "o-" if len(rs) > 1 else "o", label=label)
        for r in rs:
            ax.annotate(r["search"].replace("re-rank top", "rr"), (r["bytes"], r["recall"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector in memory (measured)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title(f"{rows[0]['n']:,} vectors, {rows[0].get('dim', '')}-d default-model embeddings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000", help="catalog sizes, comma-separated (e.g. 100000,1000000)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rerank", type=int, default=100, help="FAISS PQ: candidates re-ranked on full vectors")
    ap.add_argument("--dims", default="384,256,128,64", help="embedding sizes for the trade-off")
    ap.add_argument("--only", default="", help="Milvus index types to run (comma-separated; default all)")
    ap.add_argument("--dims-size", type=int, default=20_000, help="catalog size of the embedding-size rows")
    ap.add_argument("--skip-dims", action="store_true", help="leave out the embedding-size rows")
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument("--faiss-no-pq", action="store_true", help="FAISS: leave out IVF-PQ / OPQ (with re-rank)")
    ap.add_argument("--faiss-only", default="", help="FAISS indexes whose factory string contains one of these")
    ap.add_argument("--skip-milvus", action="store_true", help="leave out the Milvus rows")
    ap.add_argument("--pq", default="", help="IVF_PQ sweep as MxNBITS,... (default 48x8,96x8,24x8,96x4)")
    ap.add_argument("--build-cap", type=float, default=3600, help="seconds before a build is given up")
    ap.add_argument("--server-env", default="", help="extra environment of the Milvus server, K=V,...")
    ap.add_argument("--server-config", default="",
                    help="Milvus settings, KEY=V,... (milvus.yaml's dotted keys, e.g. "
                         "dataCoord.enableCompaction=false)")
    ap.add_argument("--out", default=str(BENCH_DIR / "index-rows.json"), help="rows as JSON (for --plot-from)")
    ap.add_argument("--plot-from", default="", help="only draw the plot and table from these JSON files")
    ap.add_argument("--plot-path", default=str(BENCH_DIR / "index-recall-vs-bytes.png"))
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the bytes per vector, with the server's malloc mapping every block of "
                         "--mmap-threshold bytes or more (IVF lists are small blocks: with the default "
                         "threshold a reload reuses memory the release kept, and the delta reads low)")
    ap.add_argument("--mmap-threshold", type=int, default=4096)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the servers on a kill too
    if args.plot_from:
        return replot(args.plot_from.split(","), Path(args.plot_path))

    model_dir = default_model_dir()
    meta = read_meta(model_dir)
    data = caltech_embeddings(model_dir)
    real, held = data["emb"], data["held"]
    order = component_order(model_dir)
    rng = np.random.default_rng(5)
    qidx = rng.choice(len(real), min(args.queries, len(real)), replace=False)
    queries = real[qidx]
    workdir = Path(tempfile.mkdtemp(prefix="bench-index-"))
    print(f"model {meta.model_id} ({meta.embedding_dim}-d); {len(real)} Caltech embeddings "
          f"({int(held.sum())} held out); {len(queries)} queries; cpus {os.cpu_count()}; work dir {workdir}"
          + (f"; server settings {args.server_config}" if args.server_config else ""))
    rows: list[dict] = []
    dim_rows: list[dict] = []
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()]      # in this order
    server_env = dict(kv.split("=", 1) for kv in args.server_env.split(",") if kv)
    server_config = dict(kv.split("=", 1) for kv in args.server_config.split(",") if kv)
    mb = None
    try:
        if not (args.skip_milvus and args.skip_dims):
            mb = MilvusBench(workdir, args.mmap_threshold if args.memory_only else None, server_env,
                            server_config)
        for n in [int(s) for s in args.sizes.split(",") if s]:
            x = catalog(real, n)
            truth = exact(x, queries)
            print(f"\n== {n:,} vectors, {x.shape[1]}-d ==", flush=True)
            # a fresh collection per index: on this server a rebuild of an index on the same
            # collection after a restart found the vector field's binlog gone (the first build
            # had removed it)
            configs = [] if args.skip_milvus else milvus_configs(n, x.shape[1], args.quick, args.pq)
            if only:
                configs = sorted((c for c in configs if c[0] in only), key=lambda c: only.index(c[0]))
            for kind, params, searches in configs:
                label = f"{kind} " + ",".join(f"{k}={v}" for k, v in params.items() if k != "with_raw_data")
                base = {"n": n, "dim": x.shape[1], "engine": "Milvus 2.3.5 standalone", "index": label.strip(),
                        **({"server_config": server_config} if server_config else {})}
                name = f"bench_index_{kind.lower()}_{n}"
                try:
                    insert_s = mb.insert(name, x)
                    print(f"  inserted {n:,} rows in {insert_s:.0f}s (load {load_avg()})", flush=True)
                    build_s = mb.build(name, n, kind, params, args.build_cap)
                    built = mb.measure(name, n)
                except Exception as exc:  # noqa: BLE001  (the server refuses an index it cannot build)
                    print(f"  {label}: not built here: {str(exc)[:400]} (load {load_avg()})", flush=True)
                    rows.append({**base, "error": str(exc)[:300], "load": load_avg()})
                    try:
                        mb.store.client.drop_collection(name)
                    except Exception:  # noqa: BLE001
                        pass
                    continue
                built["build_s"] = build_s
                formula = index_formula(kind, params, x.shape[1])
                print(f"  {label}: build {build_s:.1f}s, load {built['load_s']:.1f}s, {built['bytes']:.0f} "
                      f"B/vector on a fresh server (RSS {built['rss_before'] / 2**20:.0f} -> "
                      f"{built['rss_after'] / 2**20:.0f} MiB), released + loaded again {built['reload']:.0f} "
                      f"B/vector (load {load_avg()})", flush=True)
                if args.memory_only:
                    rows.append({**base, "search": "-", "bytes": built["bytes"], "formula": formula,
                                 "build_s": build_s, "recall": None, "load": load_avg(),
                                 **{k: None for k in ("p50_1", "p99_1", "qps_1", "p50_8", "p99_8", "qps_8")}})
                for sp in ([] if args.memory_only else searches):
                    r = mb.search(name, queries, truth, sp)
                    rows.append({**base, "search": ",".join(f"{k}={v}" for k, v in sp.items()),
                                 "bytes": built["bytes"], "reload": built["reload"], "formula": formula,
                                 "build_s": build_s, "load": load_avg(), **r})
                    print(f"    {rows[-1]['search']}: recall@10 {r['recall']:.3f}, p50 {r['p50_1']:.2f} ms, "
                          f"p99 {r['p99_1']:.2f} ms, QPS {r['qps_1']:.0f} / {r['qps_8']:.0f} @8, vectors back: "
                          f"{r['vectors']} (load {load_avg()})", flush=True)
                save_rows(args.out, rows, dim_rows)
                mb.store.client.drop_collection(name)
            if not args.skip_faiss:
                for r in faiss_rows(x, queries, truth, workdir, args.rerank, args.quick, not args.faiss_no_pq,
                                    [s.strip() for s in args.faiss_only.split(",") if s.strip()]):
                    rows.append({"n": n, "dim": x.shape[1], **r})
                    save_rows(args.out, rows, dim_rows)
            del x
            if not args.skip_dims:
                dim_rows += embedding_sizes(mb, data, order, min(n, args.dims_size),
                                            [int(d) for d in args.dims.split(",") if d], queries)
                save_rows(args.out, rows, dim_rows)
    finally:
        if mb is not None:
            mb.close()
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(rows)
    if dim_rows:
        print_dims(dim_rows)
    if rows:
        path = Path(args.plot_path)
        plot([r for r in rows if r["n"] == rows[-1]["n"]], path)
        print(f"\nplot: {path}")
    print(f"rows: {args.out}")
    return 0


def replot(paths: list[str], out: Path) -> int:
    """The table and the plot from the JSON rows of earlier runs (several runs, one figure)."""
    import json

    rows, dims = [], []
    for p in paths:
        z = json.loads(Path(p).read_text())
        rows += z["rows"]
        dims += z["dims"]
    print_table(rows)
    for n in sorted({r["n"] for r in rows}):
        path = out if n == min(r["n"] for r in rows) else out.with_name(f"{out.stem}-{n}{out.suffix}")
        plot([r for r in rows if r["n"] == n], path)
        print(f"plot: {path}")
    if dims:
        print_dims(dims)
    return 0


def print_dims(dim_rows: list[dict]) -> None:
    print("\n| dims | mAP@R (Caltech held-out) | vs 384 | Milvus HNSW bytes/vector measured | recall@10 (ef=64) "
          "| p50 ms | load |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = dim_rows[0]["map_r"]
    for r in dim_rows:
        print(f"| {r['dim']} | {r['map_r']:.4f} | {r['map_r'] / base:.3f} | {fmt(r.get('bytes'))} | "
              f"{fmt(r.get('recall'), '.3f')} | {fmt(r.get('p50_1'), '.2f')} | {r.get('load', '-')} |")


def embedding_sizes(mb: MilvusBench, data: dict, order: np.ndarray, n: int, dims: list[int],
                    queries_full: np.ndarray) -> list[dict]:
    """mAP@R on the held-out split and Milvus HNSW memory/recall at each embedding size."""
    from vsearch.trainer import metrics

    emb, labels, held = data["emb"], data["labels"], data["held"]
    out = []
    for d in dims:
        m = metrics.evaluate_embeddings(cut(emb[held], order, d), labels[held])
        row = {"dim": d, "map_r": float(m["metrics"]["map@r"])}
        x = cut(catalog(emb, n), order, d)           # the same catalog as the index rows, cut
        q = cut(queries_full, order, d)
        truth = exact(x, q)
        name = f"bench_dims_{d}_{n}"
        if mb is not None:
            mb.insert(name, x)
            build_s = mb.build(name, n, "HNSW", {"M": 16, "efConstruction": 200})
            built = mb.measure(name, n)
            r = mb.search(name, q, truth, {"ef": 64}, clients=8, passes=1)
            mb.store.client.drop_collection(name)
            row.update(bytes=built["bytes"], reload=built["reload"], build_s=build_s, recall=r["recall"],
                       p50_1=r["p50_1"], load=load_avg())
        else:
            built, r = {"bytes": float("nan")}, {"recall": float("nan")}
        print(f"  {d} dims: mAP@R {row['map_r']:.4f}, HNSW {built['bytes']:.0f} B/vector, "
              f"recall@10 {r['recall']:.3f}", flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
