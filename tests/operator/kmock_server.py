"""The in-memory Kubernetes API for the operator tests: kmock's ``KubernetesEmulator`` served
over HTTP on 127.0.0.1, as its own process (``python -m tests.operator.kmock_server --port P``)
so that the operator process can be SIGKILLed and restarted against the same state.

kmock stores, lists, watches, patches (JSON merge semantics) and deletes objects, honours
finalizers (a DELETE only sets ``deletionTimestamp`` while finalizers remain) and answers 404/409
like Kubernetes. It does not validate objects against CRD schemas, does not garbage-collect by
owner references and does not fill server-side metadata; this subclass adds the metadata an
operator relies on: ``uid``, ``creationTimestamp``, ``resourceVersion`` and ``generation``
(bumped when ``spec`` changes)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import signal
import uuid

import kmock
from kmock import KubernetesEmulator, ResourceInfo, Server

RESOURCES = {
    "vsearch.io/v1alpha1/searchindexes": ResourceInfo(kind="SearchIndex", singular="searchindex",
                                                      namespaced=True, subresources={"status"},
                                                      verbs={"get", "list", "watch", "create", "patch",
                                                             "update", "delete"}),
    "serving.kserve.io/v1beta1/inferenceservices": ResourceInfo(kind="InferenceService", namespaced=True,
                                                                subresources={"status"}),
    "apps/v1/deployments": ResourceInfo(kind="Deployment", namespaced=True, subresources={"status", "scale"}),
    "v1/configmaps": ResourceInfo(kind="ConfigMap", namespaced=True),
    "v1/secrets": ResourceInfo(kind="Secret", namespaced=True),
    "v1/events": ResourceInfo(kind="Event", namespaced=True),
    "v1/namespaces": ResourceInfo(kind="Namespace", namespaced=False),
}

_rv = itertools.count(1)


class FaithfulEmulator(KubernetesEmulator):
    async def _handle(self, request):
        data = request.data
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


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FaithfulEmulator() as k8s, Server(k8s, port=port) as server:
        for key, info in RESOURCES.items():
            k8s.resources[key] = info
        print(f"kmock serving on {server.url}", flush=True)
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    asyncio.run(serve(p.parse_args().port))


if __name__ == "__main__":
    main()
