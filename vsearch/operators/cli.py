"""``vsearch operator``: the SearchIndex operator (kopf underneath)."""

from __future__ import annotations

import logging
import os
import time

from ..core.config import Flags, csv_list
from . import train_node
from .trust import Trust
from .trust import add_flags as add_trust_flags

log = logging.getLogger(__name__)


def _add_kubeconfig(f: Flags) -> None:
    f.add("--kubeconfig", default=None,
          help="kubeconfig file (default: the in-cluster service account, else $KUBECONFIG / ~/.kube/config)")


def register(sub) -> None:
    p = sub.add_parser("operator", help="run the SearchIndex rollout operator (kopf)",
                       description="Watches SearchIndex objects (searchindexes.vsearch.io/v1alpha1) and "
                                   "rolls out model versions blue-green: embedder, backfill, quality "
                                   "gate, one alias switch, rollback, retention, clean-up.")
    f = Flags(p, "OPERATOR")
    _add_kubeconfig(f)
    f.add("--namespaces", default="", help="watch these namespaces (comma-separated; empty: all namespaces)")
    p.add_argument("--namespace", "-n", action="append", default=None, dest="namespace",
                   help="watch this namespace too (repeatable)")
    f.add("--interval", default=5.0, type=float, help="seconds between reconcile steps of an object")
    f.add("--metrics-port", default=None, type=int, help="serve Prometheus /metrics on this port")
    f.add("--health-port", "--liveness-port", dest="health_port", default=None, type=int,
          help="serve kopf's /healthz (liveness and readiness) on this port")
    f.add("--peering", default=False, type=bool,
          help="use kopf peering (needs the KopfPeering CRDs); default: standalone")
    add_trust_flags(f)
    p.set_defaults(handler=_operator)

    d = sub.add_parser("delete-index", help="delete a SearchIndex and wait until the operator has cleaned up",
                       description="Deletes the SearchIndex NAME and waits until it is gone: its finalizer "
                                   "has the operator remove every version's embedder, consumer, Milvus "
                                   "collection and consumer group, and the alias. The chart runs this as its "
                                   "pre-delete hook, so that `helm uninstall` does not remove the operator "
                                   "first. Exit 0 when the SearchIndex is gone (or was never there), 1 when "
                                   "it is still there after --timeout (nothing is forced: the operator's "
                                   "log says why).")
    d.add_argument("name", help="the SearchIndex's name")
    f = Flags(d, "DELETE_INDEX")
    f.add("--namespace", "-n", default="default", help="its namespace")
    _add_kubeconfig(f)
    f.add("--timeout", default=600.0, type=float, help="seconds to wait for the operator's clean-up")
    d.set_defaults(handler=_delete_index)
    train_node.register(sub)


def _load_kube_config(kubeconfig: str | None) -> None:
    import kubernetes

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
        kubernetes.config.load_kube_config(config_file=kubeconfig)
    else:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()


def _delete_index(args) -> int:
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from .crd import GROUP, PLURAL, VERSION

    _load_kube_config(args.kubeconfig)
    api = kubernetes.client.CustomObjectsApi()
    where = f"SearchIndex {args.namespace}/{args.name}"
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, args.name)
    except ApiException as exc:
        if exc.status == 404:
            print(f"{where}: not there, nothing to clean up")
            return 0
        raise SystemExit(f"{where}: delete refused ({exc.status} {exc.reason}): {(exc.body or '')[:300]}") from None
    print(f"{where}: deleted; waiting up to {args.timeout:g}s for the operator's clean-up", flush=True)
    deadline, said = time.monotonic() + args.timeout, None
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, args.name)
        except ApiException as exc:
            if exc.status == 404:
                print(f"{where}: gone (workloads, collections, consumer groups and alias removed)")
                return 0
            news = f"cannot read it ({exc.status} {exc.reason}), retrying"
        else:
            news = f"finalizers {obj['metadata'].get('finalizers') or []}, phase " \
                   f"{(obj.get('status') or {}).get('phase', '-')}"
        if news != said:
            print(f"{where}: {news}", flush=True)
            said = news
        if time.monotonic() >= deadline:
            print(f"{where}: still there after {args.timeout:g}s ({news}); is the operator running? "
                  "(`helm uninstall --no-hooks` skips this wait and leaves the clean-up undone)", flush=True)
            return 1
        time.sleep(1.0)


def _operator(args) -> int:
    import kopf
    import kubernetes

    from . import handlers

    logging.getLogger("kopf.objects").setLevel(logging.WARNING)     # "Timer succeeded" every tick
    kubeconfig = args.kubeconfig

    _load_kube_config(kubeconfig)
    trust = Trust.from_args(args)
    memo = handlers.operator_memo(kubernetes.client.ApiClient(), trust)

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
    namespaces = list(csv_list(args.namespaces)) + list(args.namespace or [])
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    log.info("vsearch operator: %s, interval %.1fs", f"namespaces {namespaces}" if namespaces else "all namespaces",
             args.interval)
    log.info("allowed: secrets %s, Milvus hosts %s, images %s, service accounts %s; catalog file roots %s",
             list(trust.secrets), list(trust.milvus_hosts), list(trust.images), list(trust.service_accounts),
             list(trust.catalog_file_roots))
    kopf.run(standalone=not args.peering, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=liveness, memo=memo)
    return 0
