"""``vsearch operator``: the SearchIndex operator (kopf underneath)."""

from __future__ import annotations

import logging
import os

from ..core.config import Flags

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("operator", help="run the SearchIndex rollout operator (kopf)",
                       description="Watches SearchIndex objects (searchindexes.vsearch.io/v1alpha1) and "
                                   "rolls out model versions blue-green: embedder, backfill, quality "
                                   "gate, one alias switch, rollback, retention, clean-up.")
    f = Flags(p, "OPERATOR")
    f.add("--kubeconfig", default=None,
          help="kubeconfig file (default: the in-cluster service account, else $KUBECONFIG / ~/.kube/config)")
    f.add("--namespaces", default="", help="watch these namespaces (comma-separated; empty: all namespaces)")
    p.add_argument("--namespace", "-n", action="append", default=None, dest="namespace",
                   help="watch this namespace too (repeatable)")
    f.add("--interval", default=5.0, type=float, help="seconds between reconcile steps of an object")
    f.add("--metrics-port", default=None, type=int, help="serve Prometheus /metrics on this port")
    f.add("--health-port", "--liveness-port", dest="health_port", default=None, type=int,
          help="serve kopf's /healthz (liveness and readiness) on this port")
    f.add("--peering", default=False, type=bool,
          help="use kopf peering (needs the KopfPeering CRDs); default: standalone")
    p.set_defaults(handler=_operator)


def _operator(args) -> int:
    import kopf
    import kubernetes

    from . import handlers

    logging.getLogger("kopf.objects").setLevel(logging.WARNING)     # "Timer succeeded" every tick
    kubeconfig = args.kubeconfig
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
        kubernetes.config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
    handlers.set_api_client(kubernetes.client.ApiClient())

    @kopf.on.login()
    def login(**kwargs):
        if kubeconfig:
            return kopf.login_with_kubeconfig(**kwargs)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    handlers.register(interval=args.interval)
    if args.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(args.metrics_port)
        log.info("metrics on :%d/metrics", args.metrics_port)
    namespaces = [n.strip() for n in args.namespaces.split(",") if n.strip()] + list(args.namespace or [])
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    log.info("vsearch operator: %s, interval %.1fs", f"namespaces {namespaces}" if namespaces else "all namespaces",
             args.interval)
    kopf.run(standalone=not args.peering, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=liveness)
    return 0
