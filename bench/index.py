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
  (a sweep of ``m``/``nbits``), SCANN, DISKANN (each tried; a refusal is printed). Bytes per
  vector = the resident memory (VmRSS) of the server's processes with the collection loaded
  minus released (load, release, load again: the second load is measured, once the garbage
  of inserting and building is gone), divided by the rows: the whole collection (index + the
  scalar fields it loads);
  the formula value of the index alone is printed beside it. Build time: ``create_index`` to
  every row indexed. p50/p99/QPS at 1 client and at 8 concurrent clients (own connections).
- FAISS in process, the reference: ``Flat`` (exact), ``IVF,PQ`` and ``OPQ,IVF,PQ`` with a
  re-rank of the top ``--rerank`` candidates on the full vectors (read from a memory map: they
  stay on disk); bytes per vector = the serialized index / rows (codes + ids + lists).
- Embedding size: the vectors cut to 256/128/64 dimensions. The whitening is a PCA (its
  columns are the eigenvectors, stored by increasing eigenvalue), so the cut keeps the
  components of largest variance: the columns of ``whitening.safetensors`` ordered by their
  eigenvalue (read from the file), then renormalised. mAP@R on the Caltech held-out split (the
  trainer's split and metric code: ``trainer.data.select_split``, ``trainer.metrics``), and
  Milvus HNSW at that size: measured bytes per vector and recall@10.

    python -m bench.index [--sizes 100000] [--queries 200] [--quick] [--skip-dims]

Prints one table (markdown) and writes the plot ``.bench/index-recall-vs-bytes.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
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
from vsearch.local.services import start_milvus_standalone
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


class MilvusBench:
    def __init__(self, workdir: Path, mmap_threshold: int | None = None):
        env = {**MALLOC_ENV, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {})}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.server = start_milvus_standalone(workdir / "milvus", log_path=workdir / "milvus.log", timeout=900)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.pgid = os.getpgid(self.server.proc.pid)
        self.store = MilvusStore(self.server.uri, timeout=1800)

    def close(self):
        self.store.close()
        self.server.stop()

    def client(self):
        from pymilvus import MilvusClient
        return MilvusClient(uri=self.server.uri, timeout=600, grpc_options=GRPC_OPTIONS, dedicated=True)

    def load(self, name: str, x: np.ndarray, kind: str, params: dict) -> dict:
        """A fresh collection with the platform's schema and this index: insert, flush, build,
        load; returns build time and measured bytes per vector."""
        from pymilvus import Collection, connections

        c = self.store.client
        if c.has_collection(name):
            c.drop_collection(name)
        c.create_collection(name, schema=self.store._schema(x.shape[1]), consistency_level="Bounded")
        connections.connect(alias="bench", uri=self.server.uri)
        coll = Collection(name, using="bench")
        t0 = time.perf_counter()
        for s in range(0, len(x), 10_000):
            e = min(len(x), s + 10_000)
            coll.insert([[f"v{i}" for i in range(s, e)], x[s:e], [""] * (e - s), [{}] * (e - s),
                         ["public"] * (e - s), [0] * (e - s)])
        c.flush(name)
        insert_s = time.perf_counter() - t0
        ip = c.prepare_index_params()
        ip.add_index(field_name="embedding", index_type=kind, metric_type="COSINE", params=params)
        t0 = time.perf_counter()
        c.create_index(name, ip)
        while True:
            info = c.describe_index(name, "embedding")
            if info.get("state") == "Failed" or info.get("index_state_fail_reason"):
                raise RuntimeError(f"index build failed: {info.get('index_state_fail_reason') or info}")
            if int(info.get("indexed_rows", 0)) >= len(x) and int(info.get("pending_index_rows", 0)) == 0:
                break
            if time.perf_counter() - t0 > 3600:
                raise TimeoutError(f"{kind} not built after an hour")
            time.sleep(0.5)
        build_s = time.perf_counter() - t0
        # Load, release, load again: the second load's RSS delta is the measurement (after the
        # first, the garbage of inserting and building has been returned to the OS).
        t0 = time.perf_counter()
        c.load_collection(name)
        load_s = time.perf_counter() - t0
        first = steady_rss(self.pgid)
        c.release_collection(name)
        released = steady_rss(self.pgid)
        c.load_collection(name)
        after = steady_rss(self.pgid)
        return {"insert_s": insert_s, "build_s": build_s, "load_s": load_s,
                "bytes": (after - released) / len(x), "freed": (first - released) / len(x),
                "rss_before": released, "rss_after": after}

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
def milvus_configs(n: int, d: int, quick: bool) -> list[tuple[str, dict, list[dict]]]:
    nlist = int(min(4096, max(64, 2 ** round(math.log2(4 * math.sqrt(n))))))
    probes = [{"nprobe": 16}, {"nprobe": 64}]
    cfgs = [("HNSW", {"M": 16, "efConstruction": 200}, [{"ef": 32}, {"ef": 64}, {"ef": 128}]),
            ("IVF_FLAT", {"nlist": nlist}, probes),
            ("IVF_SQ8", {"nlist": nlist}, probes)]
    for m, nbits in ([(48, 8)] if quick else [(48, 8), (96, 8), (24, 8), (96, 4)]):
        if d % m == 0:
            cfgs.append(("IVF_PQ", {"nlist": nlist, "m": m, "nbits": nbits}, [{"nprobe": 64}]))
    cfgs += [("SCANN", {"nlist": nlist, "with_raw_data": True}, [{"nprobe": 64, "reorder_k": 100}]),
             ("DISKANN", {}, [{"search_list": 100}])]
    return cfgs


# --------------------------------------------------------------------------- FAISS

def faiss_rows(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, workdir: Path, rerank: int,
               quick: bool, pq: bool = True) -> list[dict]:
    import faiss

    n, d = x.shape
    full = np.lib.format.open_memmap(workdir / "full.npy", mode="w+", dtype=np.float32, shape=x.shape)
    full[:] = x
    full.flush()
    nlist = int(min(4096, max(64, 2 ** round(math.log2(4 * math.sqrt(n))))))
    rows = []
    specs = [("Flat", "Flat", 0), (f"IVF{nlist},SQ8", f"IVF{nlist},SQ8", 0)]
    if pq:
        specs.append((f"IVF{nlist},PQ48 (no re-rank)", f"IVF{nlist},PQ48", 0))
        for m in ([48] if quick else [24, 48, 96]):
            specs.append((f"IVF{nlist},PQ{m}", f"IVF{nlist},PQ{m}", rerank))
        specs.append((f"OPQ48,IVF{nlist},PQ48", f"OPQ48,IVF{nlist},PQ48", rerank))
    train = x[np.random.default_rng(3).choice(n, min(n, 20_000), replace=False)]
    # one OpenMP thread everywhere: the queries run on their own threads (8 clients), and
    # OpenMP teams under Python threads on a loaded 2-core machine can stall for minutes
    faiss.omp_set_num_threads(1)
    for label, spec, rr in specs:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(train)
        index.add(x)
        build_s = time.perf_counter() - t0
        nbytes = faiss.serialize_index(index).nbytes / n
        if spec != "Flat":
            faiss.extract_index_ivf(index).nprobe = 32
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
        rows.append({"engine": "FAISS in process", "index": label,
                     "search": ("nprobe=32" if spec != "Flat" else "exact") + (f", re-rank top {rr}" if rr else ""),
                     "bytes": nbytes, "formula": float("nan"), "build_s": build_s,
                     "recall": recall([f for _, f in single], truth),
                     "p50_1": ms([t for t, _ in single], 50), "p99_1": ms([t for t, _ in single], 99),
                     "qps_1": len(single) / sum(t for t, _ in single), "p50_8": ms([t for t, _ in res], 50),
                     "p99_8": ms([t for t, _ in res], 99), "qps_8": len(res) / wall,
                     "note": "codes in memory, full vectors on disk (mmap) for the re-rank" if rr else ""})
        print(f"  faiss {label}: {nbytes:.0f} B/vector, recall@10 {rows[-1]['recall']:.3f}, "
              f"p50 {rows[-1]['p50_1']:.2f} ms", flush=True)
    return rows


# --------------------------------------------------------------------------- main

def fmt(v, spec=".0f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print("\n| n | engine | index (build) | search | bytes/vector measured | index formula | build s | "
          "recall@10 | p50 ms | p99 ms | QPS | p50 ms @8 | p99 ms @8 | QPS @8 | vectors back |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if r.get("error"):
            print(f"| {r['n']:,} | {r['engine']} | {r['index']} | - | - | - | - | - | - | - | - | - | - | - | - |"
                  f" <!-- {r['error']} -->")
            continue
        print(f"| {r['n']:,} | {r['engine']} | {r['index']} | {r['search']} | {fmt(r['bytes'])} | "
              f"{fmt(r['formula'])} | {fmt(r['build_s'], '.1f')} | {fmt(r['recall'], '.3f')} | "
              f"{fmt(r['p50_1'], '.2f')} | {fmt(r['p99_1'], '.2f')} | {fmt(r['qps_1'], '.0f')} | "
              f"{fmt(r['p50_8'], '.2f')} | {fmt(r['p99_8'], '.2f')} | {fmt(r['qps_8'], '.0f')} | "
              f"{r.get('vectors', '-')} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
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
    fig.savefig(path, dpi=120)
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
    ap.add_argument("--faiss-pq", action="store_true",
                    help="also FAISS IVF-PQ / OPQ with re-rank (PQ training did not finish here: see README)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the bytes per vector, with the server's malloc mapping every block of "
                         "--mmap-threshold bytes or more (IVF lists are small blocks: with the default "
                         "threshold a reload reuses memory the release kept, and the delta reads low)")
    ap.add_argument("--mmap-threshold", type=int, default=4096)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the servers on a kill too

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
          f"({int(held.sum())} held out); {len(queries)} queries; cpus {os.cpu_count()}; work dir {workdir}")
    rows: list[dict] = []
    dim_rows: list[dict] = []
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    mb = None
    try:
        mb = MilvusBench(workdir, args.mmap_threshold if args.memory_only else None)
        for n in [int(s) for s in args.sizes.split(",") if s]:
            x = catalog(real, n)
            truth = exact(x, queries)
            print(f"\n== {n:,} vectors, {x.shape[1]}-d ==", flush=True)
            for kind, params, searches in milvus_configs(n, x.shape[1], args.quick):
                if only and kind not in only:
                    continue
                label = f"{kind} " + ",".join(f"{k}={v}" for k, v in params.items() if k != "with_raw_data")
                name = f"bench_index_{kind.lower()}_{n}"
                try:
                    built = mb.load(name, x, kind, params)
                except Exception as exc:  # noqa: BLE001  (the server refuses an index it cannot build)
                    print(f"  {label}: not built here: {str(exc)[:300]}", flush=True)
                    rows.append({"n": n, "engine": "Milvus 2.3.5 standalone", "index": label.strip(),
                                 "error": str(exc)[:200]})
                    try:
                        mb.release(name)
                    except Exception:  # noqa: BLE001
                        pass
                    continue
                if args.memory_only:
                    rows.append({"n": n, "dim": x.shape[1], "engine": "Milvus 2.3.5 standalone (memory only)",
                                 "index": label, "search": f"malloc mmap >= {args.mmap_threshold} B",
                                 "bytes": built["bytes"], "formula": index_formula(kind, params, x.shape[1]),
                                 "build_s": built["build_s"], "freed": built["freed"], "recall": None,
                                 **{k: None for k in ("p50_1", "p99_1", "qps_1", "p50_8", "p99_8", "qps_8")}})
                print(f"  {label}: insert {built['insert_s']:.0f}s, build {built['build_s']:.1f}s, "
                      f"load {built['load_s']:.1f}s, {built['bytes']:.0f} B/vector (RSS released "
                      f"{built['rss_before'] / 2**20:.0f} -> loaded {built['rss_after'] / 2**20:.0f} MiB; the "
                      f"release before it gave back {built['freed']:.0f} B/vector)", flush=True)
                for sp in ([] if args.memory_only else searches):
                    r = mb.search(name, queries, truth, sp)
                    rows.append({"n": n, "dim": x.shape[1], "engine": "Milvus 2.3.5 standalone", "index": label,
                                 "search": ",".join(f"{k}={v}" for k, v in sp.items()), "bytes": built["bytes"],
                                 "formula": index_formula(kind, params, x.shape[1]), "build_s": built["build_s"], **r})
                    print(f"    {rows[-1]['search']}: recall@10 {r['recall']:.3f}, p50 {r['p50_1']:.2f} ms, "
                          f"QPS {r['qps_1']:.0f} / {r['qps_8']:.0f} @8, vectors back: {r['vectors']}", flush=True)
                mb.release(name)
            if not args.skip_faiss:
                for r in faiss_rows(x, queries, truth, workdir, args.rerank, args.quick, args.faiss_pq):
                    rows.append({"n": n, "dim": x.shape[1], **r})
            if not args.skip_dims:
                dim_rows += embedding_sizes(mb, data, order, min(n, args.dims_size),
                                            [int(d) for d in args.dims.split(",") if d], queries)
    finally:
        if mb is not None:
            mb.close()
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(rows)
    if dim_rows:
        print(f"\n| dims | mAP@R (Caltech held-out) | mAP@R vs 384 | Milvus HNSW bytes/vector measured "
              f"({min(args.dims_size, int(args.sizes.split(',')[-1])):,} vectors) | "
              "recall@10 (ef=64) | p50 ms |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        base = dim_rows[0]["map_r"]
        for r in dim_rows:
            print(f"| {r['dim']} | {r['map_r']:.4f} | {r['map_r'] / base:.2f} | {fmt(r.get('bytes'))} | "
                  f"{fmt(r.get('recall'), '.3f')} | {fmt(r.get('p50_1'), '.2f')} |")
    if rows:
        path = BENCH_DIR / "index-recall-vs-bytes.png"
        plot([r for r in rows if r["n"] == rows[-1]["n"]], path)
        print(f"\nplot: {path}")
    return 0


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
        built = mb.load(name, x, "HNSW", {"M": 16, "efConstruction": 200})
        r = mb.search(name, q, truth, {"ef": 64}, clients=8, passes=1)
        mb.release(name)
        row.update(bytes=built["bytes"], recall=r["recall"], p50_1=r["p50_1"])
        print(f"  {d} dims: mAP@R {row['map_r']:.4f}, HNSW {built['bytes']:.0f} B/vector, "
              f"recall@10 {r['recall']:.3f}", flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
