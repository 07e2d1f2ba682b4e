"""``vsearch serve search``, ``vsearch ctr`` and ``vsearch experiment report``. ``predictor/cli.py``
calls :func:`register_serve` with the ``serve`` sub-command group and :func:`register` and
:func:`register_experiment` with the top-level one. The handlers are the entry points of their processes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ...core.config import Flags, add_kafka_flag, add_milvus_flags, csv_list
from ..limits import add_server_flags, server_limits_from
from ..model_dir import default_model_dir
from ..preprocess import Limits, set_decoder_pixel_limit
from ..runtimes import DEFAULT_RUNTIME, add_runtime_flag
from .settings import DEFAULT_QUERY_STORE, SearchSettings

D = SearchSettings()          # every default below comes from here


def register_serve(serve_sub) -> None:
    p = serve_sub.add_parser(
        "search", help="the search service: /search, /images, /events, the web page, KServe V1/V2",
        description="Embed the query (in process with --model-dir, or through --embedder-url), "
                    "search Milvus on the serving alias, re-rank, log impressions and clicks to Kafka.")
    pf = Flags(p, "SEARCH")
    pf.add("--model-dir", default=None,
             help="embed in process with this model directory (default: models/default when present)")
    pf.add("--embedder-url", default=None, help="embed through this embedder server instead")
    pf.add("--embedder-name", default="embedder", help="the embedder's model name")
    pf.add("--embedder-api-key", default=None, secret=True, help="the embedder's API key, if it needs one")
    add_milvus_flags(pf)
    pf.add("--alias", default=D.alias, help="the Milvus alias (or collection) that serves")
    pf.add("--http-port", default=8000, type=int, help="HTTP port")
    add_kafka_flag(pf, default=None,
                   help="Kafka bootstrap servers for search events (impressions, clicks); off when unset")
    pf.add("--query-store", default=DEFAULT_QUERY_STORE,
           help="where query images are kept by content hash (events point at them): a folder, or "
                "s3://bucket/prefix for several replicas (AWS_ENDPOINT_URL and AWS credentials from the "
                "environment); empty: not kept")
    pf.add("--query-store-max-mb", default=D.query_store_max_bytes // (1024 * 1024), type=int,
           help="quota of a folder query store; past it the oldest images go (S3: a lifecycle rule)")
    pf.add("--k-default", default=D.k_default, type=int, help="results when the query gives no k")
    pf.add("--k-max", default=D.k_max, type=int, help="largest k accepted")
    pf.add("--dedup-distance", default=D.dedup_distance, type=float,
             help="cosine distance under which two results count as near-duplicates (0: off, and the "
                  "search asks Milvus for no stored vectors: faster)")
    pf.add("--overfetch", default=D.overfetch, type=float, help="candidates fetched per wanted result")
    pf.add("--filter-fields", default=",".join(D.filter_fields),
             help="metadata fields a query may filter on (comma-separated)")
    pf.add("--max-upload-bytes", default=D.max_upload_bytes, type=int, help="largest query image")
    pf.add("--max-pixels", default=D.max_pixels, type=int, help="largest query image in pixels")
    pf.add("--api-key", default=None, secret=True,
           help="require this key (X-API-Key header or Bearer token) on every endpoint but health")
    pf.add("--click-secret", default=None, secret=True,
           help="signs the token of each search, with which any replica logs its clicks: the same "
                "on every replica (unset: a random one, clicks reach only the replica that answered)")
    pf.add("--click-token-ttl", default=D.click_token_ttl_s, type=float, help="seconds a search's token can log clicks")
    pf.add("--cors-origins", default=",".join(D.cors_origins), help="origins allowed by CORS (comma-separated, * for any)")
    pf.add("--allow-url-queries", default=D.allow_url_queries, type=bool, help="accept image URLs as queries")
    pf.add("--allow-private-urls", default=D.allow_private_urls, type=bool,
             help="let URL queries reach private, loopback and link-local addresses")
    pf.add("--url-timeout", default=D.url_timeout, type=float, help="seconds to download a query URL")
    pf.add("--image-roots", default="",
           help="serve file:// catalog images only from these folders (comma-separated; empty: "
                "file:// catalog images are not served)")
    pf.add("--allow-private-image-urls", default=D.allow_private_image_urls, type=bool,
           help="let /images fetch http(s) catalog images from any address (loopback, private, "
                "link-local); by default only from globally routable ones")
    pf.add("--weak-match-score", default=D.weak_match_score, type=float,
           help="the web page says nothing in the catalog is close when the best score is under this")
    pf.add("--model-version", default=D.model_version,
             help="model version written into events (default: the embedder's model id)")
    add_server_flags(pf)
    pf.add("--allowed-embedder-urls", default="",
           help="embedder URLs (shell patterns, comma-separated) a collection's model record may name, "
                "besides --embedder-url; the query image goes there (e.g. http://*-predictor.NS.svc)")
    pf.add("--device", default=None, help="torch device for in-process embedding")
    pf.add("--threads", default=None, type=int,
           help="CPU threads of in-process embedding (torch's, or the ONNX Runtime / OpenVINO intra-op threads)")
    add_runtime_flag(pf)
    pf.add("--search-threads", default=D.threads, type=int,
           help="threads running searches at once (0: asyncio's default, min(32, CPUs + 4))")
    pf.add("--embed-batch", default=D.embed_batch, type=int,
           help="in-process embedding: concurrent queries share a forward pass of up to this many "
                "images (1: one pass per query)")
    p.set_defaults(handler=_serve_search)


def register(sub) -> None:
    p = sub.add_parser("ctr", help="click-through rate per model version from the search.events topic")
    pf = Flags(p, "CTR")
    add_kafka_flag(pf)
    pf.add("--topic", default="search.events", help="topic of search events")
    pf.add("--idle-timeout", default=3.0, type=float,
             help="stop reading after this many seconds without a new record")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_ctr)


def _serve_search(args) -> int:
    if args.embedder_url and args.model_dir:
        print("vsearch serve search: give --model-dir or --embedder-url, not both", file=sys.stderr)
        return 2
    if not 1 <= args.k_default <= args.k_max:
        print("vsearch serve search: need 1 <= --k-default <= --k-max", file=sys.stderr)
        return 2
    if args.search_threads < 0 or args.embed_batch < 1:
        print("vsearch serve search: need --search-threads >= 0 and --embed-batch >= 1", file=sys.stderr)
        return 2
    model_dir = args.model_dir
    if not args.embedder_url and not model_dir:
        model_dir = default_model_dir()
        if not (model_dir / "config.json").exists():
            print(f"vsearch serve search: give --model-dir or --embedder-url ({model_dir} is absent)",
                  file=sys.stderr)
            return 2
    settings = SearchSettings(
        alias=args.alias, k_default=args.k_default, k_max=args.k_max, overfetch=args.overfetch,
        dedup_distance=args.dedup_distance, filter_fields=csv_list(args.filter_fields),
        max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
        query_store=args.query_store or None, query_store_max_bytes=args.query_store_max_mb * 1024 * 1024,
        allow_url_queries=args.allow_url_queries, allow_private_urls=args.allow_private_urls,
        url_timeout=args.url_timeout, api_key=args.api_key or None,
        click_secret=args.click_secret or None, click_token_ttl_s=args.click_token_ttl,
        cors_origins=csv_list(args.cors_origins),
        image_roots=tuple(Path(r).resolve() for r in csv_list(args.image_roots)),
        allow_private_image_urls=args.allow_private_image_urls,
        model_version=args.model_version, weak_match_score=args.weak_match_score,
        allowed_embedder_urls=csv_list(args.allowed_embedder_urls),
        threads=args.search_threads, embed_batch=args.embed_batch)

    from ..serving import hide_argv_from_kserve, run_model_server
    hide_argv_from_kserve()
    from ..inference import set_torch_threads
    set_torch_threads(args.threads)
    set_decoder_pixel_limit(args.max_pixels)
    from ...core.store import MilvusStore
    from .model import SearchModel
    from .routes import add_routes
    model = SearchModel(lambda: build_service(settings, MilvusStore.from_args(args), model_dir=model_dir,
                                              embedder_url=args.embedder_url,
                                              embedder_name=args.embedder_name,
                                              embedder_api_key=args.embedder_api_key,
                                              bootstrap=args.kafka_bootstrap, device=args.device,
                                              runtime=args.runtime))
    try:
        run_model_server(model, http_port=args.http_port,
                         add_routes=lambda app: add_routes(app, lambda: model.service, settings),
                         api_key=settings.api_key,     # rejections are counted by the routes' middleware
                         # base64 of the largest upload, plus room for the form or JSON around it
                         limits=server_limits_from(args, max_body_bytes=settings.max_upload_bytes * 4 // 3
                                                   + 256 * 1024))
    finally:
        if model.service is not None:
            model.service.close()
    return 0


def build_service(settings, store, *, model_dir=None, embedder_url: str | None = None,
                  embedder_name: str = "embedder", bootstrap: str | None = None, device: str | None = None,
                  embedder_api_key: str | None = None, runtime: str = DEFAULT_RUNTIME):
    """The search service of the flags: an in-process embedder (``model_dir``) or the
    embedder's V2 endpoint (``embedder_url``), the Milvus index through ``store`` (a
    :class:`~vsearch.core.store.MilvusStore` with the token and index settings), the event log."""
    from .event_log import EventLog
    from .index import CatalogIndex
    from .service import SearchService

    if embedder_url:
        from ..client import EmbedderClient
        embedder = EmbedderClient(embedder_url, model_name=embedder_name, timeout=30.0, api_key=embedder_api_key)
    else:
        from ..inference import Embedder
        embedder = Embedder(model_dir, device=device, batch_size=settings.embed_batch, decode_workers=2,
                            runtime=runtime,
                            limits=Limits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels))
        if settings.embed_batch > 1:
            from ..coalesce import CoalescingEmbedder
            embedder = CoalescingEmbedder(embedder, max_batch=settings.embed_batch)
    # the stored vectors only when the near-duplicate re-rank compares them (a cheaper search otherwise)
    index = CatalogIndex(store, settings.alias, vectors=settings.dedup_distance > 0)
    svc = SearchService(embedder, index, settings, EventLog(bootstrap), embedder_name=embedder_name,
                        embedder_api_key=embedder_api_key)
    if not svc.tokens.shared:
        logging.getLogger(__name__).warning(
            "no --click-secret: this replica signs search tokens with a key of its own, so only it "
            "accepts their clicks; give every replica the same secret")
    logging.getLogger(__name__).info(
        "search service: alias %r on %s (%s), embedder %s, events %s, model version %s", settings.alias,
        store.uri, store.index.index_type, embedder_url or model_dir, bootstrap or "off", svc.model_version)
    return svc


def _ctr(args) -> int:
    from kafka.errors import KafkaError

    from .ctr import ctr_table, read_events
    try:
        stats = ctr_table(read_events(args.kafka_bootstrap, args.topic, args.idle_timeout))
    except KafkaError as exc:
        print(f"vsearch ctr: cannot read {args.topic} from {args.kafka_bootstrap}: {exc}", file=sys.stderr)
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


def register_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="online experiments between model versions (A/B, interleaving)")
    exp_sub = p.add_subparsers(dest="experiment_command", metavar="COMMAND", required=True)
    r = exp_sub.add_parser(
        "report", help="an online experiment's figures and decision from the search.events topic",
        description="Reads the search.events topic, analyses one experiment as the operator does "
                    "(per arm: impressions, clicks, CTR with its interval per randomisation unit; "
                    "interleaving: wins, losses, ties and the preference; guardrails; the decision "
                    "with always-valid confidence sequences) and prints a table, JSON (--json) "
                    "and/or a PNG of CTR per arm over time with its band (--plot). Exit 0 with a "
                    "report, 1 when the topic cannot be read or holds no such experiment.")
    f = Flags(r, "EXPERIMENT")
    add_kafka_flag(f)
    f.add("--topic", default="search.events", help="topic of search events")
    f.add("--idle-timeout", default=3.0, type=float, help="stop reading after this many seconds without a new record")
    f.add("--experiment", default=None, help="the experiment's id (default: the newest on the topic)")
    f.add("--alpha", default=0.05, type=float, help="error rate of the decision (as spec.rollout.experiment.alpha)")
    f.add("--margin", default=0.0, type=float, help="relative CTR margin of non-inferiority (0.02 = 2 %)")
    f.add("--promote-when", default="notWorse", choices=("notWorse", "better"), help="promote when the candidate is")
    f.add("--min-units", default=200, type=int, help="no decision before this many units")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.add("--plot", default=None, help="also write a PNG: CTR per arm over time with its always-valid band")
    r.set_defaults(handler=_experiment_report)


def _experiment_report(args) -> int:
    from kafka.errors import KafkaError

    from ...core.experiment_stats import Policy
    from ...core.jsonsafe import json_safe
    from .ctr import read_events
    from .experiment_report import format_table, plot, report

    try:
        policy = Policy(alpha=args.alpha, margin=args.margin, promote_when=args.promote_when, min_units=args.min_units)
    except ValueError as exc:
        print(f"vsearch experiment report: {exc}", file=sys.stderr)
        return 2
    try:
        result = report(read_events(args.kafka_bootstrap, args.topic, args.idle_timeout), args.experiment, policy)
    except KafkaError as exc:
        print(f"vsearch experiment report: cannot read {args.topic} from {args.kafka_bootstrap}: {exc}",
              file=sys.stderr)
        return 1
    except LookupError as exc:
        print(f"vsearch experiment report: {exc}", file=sys.stderr)
        return 1
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError as exc:
            print(f"vsearch experiment report: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(json_safe(result), indent=2, sort_keys=True))
    else:
        print(format_table(result))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
