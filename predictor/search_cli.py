"""``vsearch serve search``, ``vsearch demo`` and ``vsearch ctr``.

``predictor.cli`` calls :func:`register_serve` with the ``serve`` sub-command group and
:func:`register` with the top-level one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vsearch.config import add_flag


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text or "").split(",") if p.strip())


def default_model_dir() -> str | None:
    from predictor.model import DEFAULT_MODEL_DIR
    return str(DEFAULT_MODEL_DIR) if (Path(DEFAULT_MODEL_DIR) / "config.json").exists() else None


def register_serve(serve_sub) -> None:
    p = serve_sub.add_parser(
        "search", help="the search service: /search, /images, /events, the web page, KServe V1/V2",
        description="Embed the query (in process with --model-dir, or through --embedder-url), "
                    "search Milvus on the serving alias, re-rank, log impressions and clicks to Kafka.")
    add_flag(p, "--model-dir", default=None,
             help="embed in process with this model directory (default: models/default when present)")
    add_flag(p, "--embedder-url", default=None, help="embed through this embedder server instead")
    add_flag(p, "--embedder-name", default="embedder", help="the embedder's model name")
    add_flag(p, "--milvus-uri", default=None, help="Milvus URI (http://host:port or a Milvus Lite file)")
    add_flag(p, "--alias", default="images", help="the Milvus alias (or collection) that serves")
    add_flag(p, "--http-port", default=8000, type=int, help="HTTP port")
    add_flag(p, "--bootstrap", default=None,
             help="Kafka bootstrap servers for search events (impressions, clicks); off when unset")
    add_flag(p, "--query-store", default=".vsearch/queries",
             help="folder where query images are kept by content hash (events point at them); "
                  "empty: not kept")
    add_flag(p, "--k-default", default=20, type=int, help="results when the query gives no k")
    add_flag(p, "--k-max", default=100, type=int, help="largest k accepted")
    add_flag(p, "--dedup-distance", default=0.02, type=float,
             help="cosine distance under which two results count as near-duplicates (0: off)")
    add_flag(p, "--overfetch", default=3.0, type=float, help="candidates fetched per wanted result")
    add_flag(p, "--filter-fields", default="label,category,source,group",
             help="metadata fields a query may filter on (comma-separated)")
    add_flag(p, "--max-upload-bytes", default=20 * 1024 * 1024, type=int, help="largest query image")
    add_flag(p, "--max-pixels", default=40_000_000, type=int, help="largest query image in pixels")
    add_flag(p, "--ef", default=None, type=int, help="HNSW search breadth (default: the store's)")
    add_flag(p, "--milvus-timeout", default=10.0, type=float, help="seconds per Milvus call")
    add_flag(p, "--api-key", default=None,
             help="require this key (X-API-Key header or Bearer token) on every endpoint but health")
    add_flag(p, "--cors-origins", default="", help="origins allowed by CORS (comma-separated, * for any)")
    add_flag(p, "--allow-url-queries", default=False, type=bool, help="accept image URLs as queries")
    add_flag(p, "--allow-private-urls", default=False, type=bool,
             help="let URL queries reach private, loopback and link-local addresses")
    add_flag(p, "--url-timeout", default=5.0, type=float, help="seconds to download a query URL")
    add_flag(p, "--image-roots", default="",
             help="serve file:// catalog images only from these folders (comma-separated; empty: any)")
    add_flag(p, "--model-version", default=None,
             help="model version written into events (default: the embedder's model id)")
    add_flag(p, "--device", default=None, help="torch device for in-process embedding")
    add_flag(p, "--threads", default=None, type=int, help="torch CPU threads")
    p.set_defaults(handler=_serve_search)


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole platform on this machine and open the web page",
                       description="Starts the Kafka broker, Milvus Lite (server), the embedder, the "
                                   "catalog consumer and the search service; publishes a sample "
                                   "catalog through Kafka; prints the URL. Ctrl-C stops everything.")
    add_flag(p, "--model-dir", default=None,
             help="model directory (default: models/default, else a random-initialised resnet-tiny)")
    add_flag(p, "--catalog", default=None,
             help="folder of images to publish (default: scikit-image's sample photos and variants)")
    add_flag(p, "--data-dir", default=".demo", help="where the demo keeps Milvus data, logs, queries")
    add_flag(p, "--http-port", default=8000, type=int,
             help="HTTP port of the search service and web page (0: any free port)")
    add_flag(p, "--ready-timeout", default=300.0, type=float,
             help="seconds to wait for the catalog to be searchable")
    p.add_argument("--check", "--smoke", dest="check", action="store_true",
                   help="run one query end to end, print the result and exit (0 = it worked)")
    p.set_defaults(handler=_demo)

    p = sub.add_parser("ctr", help="click-through rate per model version from the search.events topic")
    add_flag(p, "--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    add_flag(p, "--topic", default="search.events", help="topic of search events")
    add_flag(p, "--idle-timeout", default=3.0, type=float,
             help="stop reading after this many seconds without a new record")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_ctr)


def _serve_search(args) -> int:
    import logging

    from predictor.search import SearchSettings, ServeOptions, serve

    if not args.milvus_uri:
        print("vsearch serve search: --milvus-uri is required (or VSEARCH_MILVUS_URI)", file=sys.stderr)
        return 2
    model_dir = args.model_dir
    if not args.embedder_url and not model_dir:
        model_dir = default_model_dir()
        if not model_dir:
            print("vsearch serve search: give --model-dir or --embedder-url (models/default is absent)",
                  file=sys.stderr)
            return 2
    if args.embedder_url and args.model_dir:
        print("vsearch serve search: give --model-dir or --embedder-url, not both", file=sys.stderr)
        return 2
    if not 1 <= args.k_default <= args.k_max:
        print("vsearch serve search: need 1 <= --k-default <= --k-max", file=sys.stderr)
        return 2
    settings = SearchSettings(
        alias=args.alias, k_default=args.k_default, k_max=args.k_max, overfetch=args.overfetch,
        dedup_distance=args.dedup_distance, filter_fields=_csv(args.filter_fields),
        max_upload_bytes=args.max_upload_bytes, milvus_timeout=args.milvus_timeout, ef=args.ef,
        query_store=Path(args.query_store) if args.query_store else None,
        allow_url_queries=args.allow_url_queries, allow_private_urls=args.allow_private_urls,
        url_timeout=args.url_timeout, api_key=args.api_key or None,
        cors_origins=_csv(args.cors_origins),
        image_roots=tuple(Path(r).resolve() for r in _csv(args.image_roots)),
        model_version=args.model_version)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    serve(ServeOptions(milvus_uri=args.milvus_uri, model_dir=model_dir, embedder_url=args.embedder_url,
                       embedder_name=args.embedder_name, bootstrap=args.bootstrap,
                       http_port=args.http_port, device=args.device, threads=args.threads,
                       max_pixels=args.max_pixels, settings=settings))
    return 0


def _demo(args) -> int:
    from vsearch.demo import run_demo
    return run_demo(model_dir=args.model_dir, catalog=args.catalog, data_dir=args.data_dir,
                    port=args.http_port, timeout=args.ready_timeout, check=args.check)


# --------------------------------------------------------------------------- ctr

def read_events(bootstrap: str, topic: str = "search.events", idle_timeout: float = 3.0):
    """Every record on the topic (``search_events.read_all``); ``{"_bad": reason}`` for each
    undecodable one; nothing when the topic does not exist yet."""
    from vsearch import search_events

    try:
        for rec in search_events.read_all(bootstrap, topic, idle_s=idle_timeout, client_id="vsearch-ctr"):
            yield {"_bad": str(rec)} if isinstance(rec, search_events.BadSearchEvent) else rec
    except LookupError:
        return


def ctr_table(records) -> dict[str, dict]:
    """Per model version: impressions, clicks, CTR (clicks / impressions) and the share of
    searches with at least one click. Duplicates (at-least-once delivery) count once."""
    seen_imp, seen_click = set(), set()
    stats: dict[str, dict] = {}
    clicked_queries: dict[str, set] = {}
    bad = 0
    for rec in records:
        if "_bad" in rec:
            bad += 1
            continue
        mv = str(rec.get("model_version"))
        s = stats.setdefault(mv, {"impressions": 0, "clicks": 0})
        if rec["type"] == "impression":
            if rec["query_id"] in seen_imp:
                continue
            seen_imp.add(rec["query_id"])
            s["impressions"] += 1
        else:
            key = (rec["query_id"], rec.get("item_id"))
            if key in seen_click:
                continue
            seen_click.add(key)
            s["clicks"] += 1
            clicked_queries.setdefault(mv, set()).add(rec["query_id"])
    for mv, s in stats.items():
        n = s["impressions"]
        s["ctr"] = round(s["clicks"] / n, 4) if n else None
        s["searches_with_click"] = round(len(clicked_queries.get(mv, ())) / n, 4) if n else None
    if bad:
        stats["_undecodable_records"] = {"count": bad}
    return stats


def _ctr(args) -> int:
    import logging

    from kafka.errors import KafkaError

    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        stats = ctr_table(read_events(args.bootstrap, args.topic, args.idle_timeout))
    except KafkaError as exc:
        print(f"vsearch ctr: cannot read {args.topic} from {args.bootstrap}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    rows = [(mv, s) for mv, s in sorted(stats.items()) if not mv.startswith("_")]
    if not rows:
        print(f"no search events on {args.topic}")
        return 0
    print(f"{'model version':<40} {'impressions':>11} {'clicks':>7} {'CTR':>7} {'searches w/ click':>18}")
    for mv, s in rows:
        ctr = f"{s['ctr']:.3f}" if s["ctr"] is not None else "-"
        swc = f"{s['searches_with_click']:.3f}" if s["searches_with_click"] is not None else "-"
        print(f"{mv:<40} {s['impressions']:>11} {s['clicks']:>7} {ctr:>7} {swc:>18}")
    if "_undecodable_records" in stats:
        print(f"({stats['_undecodable_records']['count']} undecodable records skipped)")
    return 0
