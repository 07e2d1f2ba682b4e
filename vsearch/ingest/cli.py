"""``vsearch ingest`` (the catalog consumer) and ``vsearch publish`` (catalog owners' tool)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.config import Flags, add_kafka_flag, add_milvus_flags, csv_list
from ..core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..core.naming import DEFAULT_ALIAS, collection_name
from ..predictor.preprocess import Limits, set_decoder_pixel_limit
from ..predictor.runtimes import add_runtime_flag

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("ingest", help="consume the catalog topic into Milvus (one model version)",
                       description="Keep one Milvus collection equal to the catalog topic: validate, "
                                   "fetch, embed, upsert/delete, dead-letter, commit after the write.")
    pf = Flags(p, "INGEST")
    add_kafka_flag(pf)
    pf.add("--topic", default="catalog.images", help="catalog topic")
    pf.add("--group", default=None, help="consumer group (default ingest-<collection>; one per model version)")
    pf.add("--dlq-topic", default=None, help="dead-letter topic (default <topic>.dlq)")
    src = p.add_mutually_exclusive_group()
    srcf = Flags(src, "INGEST")
    srcf.add("--model-dir", default=None, help="embed in process with this model directory")
    srcf.add("--embedder-url", default=None, help="embed through this embedder's V2 endpoint")
    pf.add("--embedder-model-name", default="embedder", help="model name at --embedder-url")
    pf.add("--embedder-timeout", default=60.0, type=float, help="seconds per embedder request")
    pf.add("--embedder-api-key", default=None, secret=True, help="the embedder's API key, if it needs one")
    pf.add("--collection", default=None,
             help="Milvus collection (default images__<model>__<version> from --model-dir; "
                  "required with --embedder-url)")
    pf.add("--alias", default=DEFAULT_ALIAS, help="alias created for this collection when absent ('' = none)")
    pf.add("--model-name", default=None,
           help="model recorded in a collection this creates (default: --model-dir's; with "
                "--embedder-url, give it with --model-version so search finds the model's embedder)")
    pf.add("--model-version", default=None, help="model version recorded in a collection this creates")
    add_milvus_flags(pf)
    pf.add("--batch-size", default=256, type=int, help="most records per batch")
    pf.add("--batch-ms", default=500, type=int, help="longest wait for a batch to fill, ms")
    pf.add("--version-cache", default=200_000, type=int,
           help="ids whose stored version the consumer keeps between batches instead of a Strong read "
                "per batch (keyed events only; cleared for a partition at every rebalance); 0: off")
    pf.add("--embed-batch-size", default=32, type=int,
           help="images per forward pass in process, per request with --embedder-url (<= its --max-batch)")
    pf.add("--threads", default=None, type=int,
           help="CPU threads of in-process embedding (torch's, or the ONNX Runtime / OpenVINO intra-op threads)")
    add_runtime_flag(pf)
    pf.add("--device", default=None, help="torch device (in process)")
    pf.add("--max-pixels", default=DEFAULT_MAX_PIXELS, type=int, help="largest image accepted, in pixels")
    pf.add("--max-image-bytes", default=DEFAULT_MAX_BYTES, type=int, help="largest image file, bytes")
    pf.add("--fetch-connect-timeout", default=3.0, type=float, help="image fetch connect timeout, s")
    pf.add("--fetch-read-timeout", default=10.0, type=float, help="image fetch read timeout, s")
    pf.add("--fetch-total-timeout", default=30.0, type=float,
           help="longest time for one image fetch, redirects and retries included, s")
    pf.add("--fetch-retries", default=3, type=int, help="retries of a transient fetch error")
    pf.add("--file-roots", default="",
           help="read file:// catalog images only under these folders (comma-separated; empty: "
                "file:// URIs are refused)")
    pf.add("--fetch-allow-private", default=False, type=bool,
           help="let http(s) image URIs reach any address (loopback, private, link-local); "
                "by default only globally routable ones")
    pf.add("--fetch-allow-networks", default="",
           help="CIDRs that http(s) image URIs may reach besides the global addresses, "
                "e.g. an internal CDN (comma-separated)")
    pf.add("--fetch-workers", default=8, type=int, help="parallel image fetches")
    pf.add("--retry-max-s", default=10.0, type=float, help="longest backoff during an outage, s")
    pf.add("--stop-grace-s", default=30.0, type=float,
             help="after SIGTERM, how long an outage may delay the last batch before exiting uncommitted")
    pf.add("--exit-when-idle", default=None, type=float,
             help="exit after this many seconds without records (backfill jobs)")
    pf.add("--dlq-max-bytes", default=900_000, type=int,
           help="largest value kept in a dead-letter record; a larger one is cut (header dlq.truncated)")
    pf.add("--partitions", default=3, type=int, help="partitions when this creates the topic")
    pf.add("--metrics-port", default=None, type=int, help="serve Prometheus /metrics on this port")
    p.set_defaults(handler=_ingest)

    p = sub.add_parser("publish", help="publish catalog events (a folder or CSV of images, or deletes)")
    pf = Flags(p, "PUBLISH")
    add_kafka_flag(pf)
    pf.add("--topic", default="catalog.images", help="catalog topic")
    p.add_argument("path", nargs="?", help="folder of images, or CSV with id,uri[,metadata][,visibility]")
    p.add_argument("--delete", nargs="+", metavar="ID", help="publish delete events for these ids")
    p.add_argument("--inline", action="store_true", help="send image bytes inline (image_b64), not file:// URIs")
    pf.add("--visibility", default="public", help="public or private")
    pf.add("--partitions", default=3, type=int, help="partitions when this creates the topic")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_publish)


def _publish(args) -> int:
    from .publish import run
    return run(args)


def _ingest(args) -> int:
    from ..core.fetch import FetchConfig, Fetcher, parse_networks
    from ..core.store import MilvusStore
    from ..predictor.inference import set_torch_threads
    from .consumer import IngestConsumer, IngestSettings

    if not args.model_dir and not args.embedder_url:
        raise SystemExit("give --model-dir (embed in process) or --embedder-url (embed over HTTP)")
    if args.version_cache < 0:
        raise SystemExit(f"--version-cache must be 0 (off) or a positive number of ids, got {args.version_cache}")
    set_decoder_pixel_limit(args.max_pixels)
    if args.embedder_url:
        from ..predictor.client import EmbedderClient
        if not args.collection:
            raise SystemExit("with --embedder-url, name the collection: --collection "
                             "images__<model>__<version>")
        embedder = EmbedderClient(args.embedder_url, model_name=args.embedder_model_name,
                                  timeout=args.embedder_timeout, batch_size=args.embed_batch_size,
                                  api_key=args.embedder_api_key)
        collection = args.collection
    else:
        from ..predictor.inference import Embedder
        set_torch_threads(args.threads)
        embedder = Embedder(args.model_dir, device=args.device, batch_size=args.embed_batch_size, runtime=args.runtime,
                            limits=Limits(max_bytes=args.max_image_bytes, max_pixels=args.max_pixels))
        collection = args.collection or collection_name(embedder.meta.name, embedder.meta.version)
    store = MilvusStore.from_args(args)
    record = None
    name = args.model_name or (None if args.embedder_url else embedder.meta.name)
    version = args.model_version or (None if args.embedder_url else embedder.meta.version)
    if name and version:
        record = {"model": str(name), "version": str(version), "embedder_url": args.embedder_url or ""}
    settings = IngestSettings(
        bootstrap=args.kafka_bootstrap, topic=args.topic, group=args.group or f"ingest-{collection}",
        collection=collection, alias=args.alias or None, dlq=args.dlq_topic,
        batch_size=args.batch_size, batch_ms=args.batch_ms, retry_max_s=args.retry_max_s,
        version_cache=args.version_cache,
        stop_grace_s=args.stop_grace_s, exit_when_idle_s=args.exit_when_idle, partitions=args.partitions,
        dlq_max_bytes=args.dlq_max_bytes, record=record)
    try:
        networks = parse_networks(args.fetch_allow_networks)
    except ValueError as exc:
        raise SystemExit(f"--fetch-allow-networks: {exc}") from None
    fetcher = Fetcher(FetchConfig(connect_timeout=args.fetch_connect_timeout,
                                  read_timeout=args.fetch_read_timeout, total_timeout=args.fetch_total_timeout,
                                  max_bytes=args.max_image_bytes, retries=args.fetch_retries,
                                  workers=args.fetch_workers, allow_private=args.fetch_allow_private,
                                  allow_networks=networks,
                                  file_roots=tuple(Path(r) for r in csv_list(args.file_roots))))
    if args.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(args.metrics_port)
        log.info("metrics on :%d/metrics", args.metrics_port)
    consumer = IngestConsumer(settings, embedder, store, fetcher)
    consumer.install_signal_handlers()
    log.info("ingest %s -> %s (group %s, alias %s)", args.topic, collection, settings.group, settings.alias)
    return consumer.run()
