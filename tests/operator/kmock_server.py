"""The in-memory Kubernetes API for the operator tests: kmock's ``KubernetesEmulator`` served
over HTTP on 127.0.0.1, as its own process (``python -m tests.operator.kmock_server --port P``)
so that the operator process can be SIGKILLed and restarted against the same state.

kmock stores, lists, watches, patches (JSON merge semantics) and deletes objects, honours
finalizers (a DELETE only sets ``deletionTimestamp`` while finalizers remain) and answers 404/409
like Kubernetes. It does not validate objects against CRD schemas, does not garbage-collect by
owner references and does not fill server-side metadata; this subclass adds the metadata an
operator relies on: ``uid``, ``creationTimestamp``, ``resourceVersion`` and ``generation``
(bumped when ``spec`` changes), and serves the resources of a CustomResourceDefinition once it
is created (its served versions, scope, names and subresources), as an API server does.

The SearchIndex is served from the start, as if its CRD were installed; with
``--without-searchindex`` it is served only once its CRD is created (tests/deploy applies the
chart's CRD)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import signal
import uuid

import kmock
from kmock import KubernetesEmulator, ResourceInfo, Server

VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
SEARCHINDEX = {"vsearch.io/v1alpha1/searchindexes": ResourceInfo(kind="SearchIndex", singular="searchindex",
                                                                 namespaced=True, subresources={"status"},
                                                                 verbs=VERBS)}
RESOURCES = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": ResourceInfo(kind="CustomResourceDefinition",
                                                                      namespaced=False, verbs=VERBS),
    "serving.kserve.io/v1beta1/inferenceservices": ResourceInfo(kind="InferenceService", namespaced=True,
                                                                subresources={"status"}),
    "apps/v1/deployments": ResourceInfo(kind="Deployment", namespaced=True, subresources={"status", "scale"}),
    "v1/configmaps": ResourceInfo(kind="ConfigMap", namespaced=True),
    "v1/secrets": ResourceInfo(kind="Secret", namespaced=True),
    "v1/events": ResourceInfo(kind="Event", namespaced=True),
    "v1/namespaces": ResourceInfo(kind="Namespace", namespaced=False),
}

_rv = itertools.count(1)


def crd_resources(crd: dict) -> dict[str, ResourceInfo]:
    """The resources a CustomResourceDefinition declares (one per served version)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = {}
    for v in spec.get("versions") or []:
        if v.get("served", True):
            out[f"{spec['group']}/{v['name']}/{names['plural']}"] = ResourceInfo(
                kind=names.get("kind"), singular=names.get("singular"), namespaced=spec.get("scope") == "Namespaced",
                shortnames=set(names.get("shortNames") or ()), categories=set(names.get("categories") or ()),
                subresources=set(v.get("subresources") or ()), verbs=VERBS)
    return out


class FaithfulEmulator(KubernetesEmulator):
    async def _handle(self, request):
        data = request.data
        if (request.action == kmock.action.CREATE and request.resource is not None and isinstance(data, dict)
                and request.resource.group == "apiextensions.k8s.io"
                and request.resource.plural == "customresourcedefinitions"):
            for key, info in crd_resources(data).items():
                self.resources[key] = info
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {}) if data or request.action == kmock.action.CREATE else None
            if request.action == kmock.action.CREATE and meta is not None:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp",
                                datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(_rv))
            elif request.action == kmock.action.UPDATE and meta is not None and request.name:
                meta["resourceVersion"] = str(next(_rv))
                if "spec" in data and not request.subresource:
                    key = (request.resource, request.namespace, request.name)
                    if key in self.objects and not self.objects[key].deleted:
                        gen = (self.objects[key].get("metadata") or {}).get("generation") or 1
                        meta["generation"] = int(gen) + 1
        return await super()._handle(request)


async def serve(port: int, searchindex: bool = True) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FaithfulEmulator() as k8s, Server(k8s, port=port) as server:
        for key, info in {**RESOURCES, **(SEARCHINDEX if searchindex else {})}.items():
            k8s.resources[key] = info
        print(f"kmock serving on {server.url}", flush=True)
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--without-searchindex", action="store_true",
                   help="serve searchindexes only once their CRD is created")
    args = p.parse_args()
    asyncio.run(serve(args.port, searchindex=not args.without_searchindex))


if __name__ == "__main__":
    main()
