"""What writing a ``SearchIndex`` may grant: the operator's own configuration, never the object's.

The operator runs with more rights than a SearchIndex author needs to have: it reads Secrets,
creates workloads and talks to Milvus and to the embedders it starts. A SearchIndex names what
it wants; :meth:`Trust.refusals` lists what of that the operator's allow-lists
(``vsearch operator --allowed-...``, ``VSEARCH_OPERATOR_ALLOWED_...``) do not allow, and the
rollout refuses such an object (``reason: NotAllowed``) before it reads a Secret, connects to
anything or creates anything.

- ``--allowed-secrets``: Secrets ``milvus.tokenSecretRef`` and the workloads'
  ``env[].valueFrom.secretKeyRef`` may name: ``NAME`` (any watched namespace) or
  ``NAMESPACE/NAME``, shell-style patterns (``milvus-*``). Default: none.
- ``--allowed-milvus-hosts``: ``milvus.uri``'s ``HOST`` or ``HOST:PORT`` (patterns). Default:
  none (every SearchIndex is refused until the operator is told which Milvus it may use).
- ``--allowed-images``: image prefixes of the embedder and ingest workloads (``registry.example.com/vsearch:``).
  Default: ``vsearch:`` (the project's own image, the spec's default ``vsearch:latest``).
- ``--allowed-service-accounts``: ``serviceAccountName`` of the workloads, ``NAME`` or
  ``NAMESPACE/NAME`` patterns. Default: none (the namespace's default account, no token).

The operator never reads a local file named by a SearchIndex: the golden set comes from a
ConfigMap or an ``http(s)://`` URL, its queries are ``catalog:<id>`` or ``http(s)://`` (see
:mod:`vsearch.operators.gate`); catalog images the gate embeds are read under ``--catalog-file-roots``
only (default: none; the tests and the demo name their photo folders). The learning loop reads a
trained model's ``vsearch_model.json`` from ``s3://`` or, for a path ``modelUri``, under
``--model-file-roots`` only (default: none). ``spec.training``'s image, service account and
env Secrets are checked like the workloads' when training is enabled."""

from __future__ import annotations

import dataclasses
import fnmatch
import urllib.parse

from ..core.config import csv_list


@dataclasses.dataclass(frozen=True)
class Trust:
    secrets: tuple[str, ...] = ()
    milvus_hosts: tuple[str, ...] = ()
    images: tuple[str, ...] = ("vsearch:",)
    service_accounts: tuple[str, ...] = ()
    catalog_file_roots: tuple[str, ...] = ()
    fetch_allow_networks: tuple[str, ...] = ()
    model_file_roots: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args) -> "Trust":
        return cls(secrets=tuple(csv_list(args.allowed_secrets)),
                   milvus_hosts=tuple(csv_list(args.allowed_milvus_hosts)),
                   images=tuple(csv_list(args.allowed_images)),
                   service_accounts=tuple(csv_list(args.allowed_service_accounts)),
                   catalog_file_roots=tuple(csv_list(args.catalog_file_roots)),
                   fetch_allow_networks=tuple(csv_list(args.fetch_allow_networks)),
                   model_file_roots=tuple(csv_list(getattr(args, "model_file_roots", "") or "")))

    # -- single checks
    @staticmethod
    def _named(patterns, namespace: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(f"{namespace}/{name}" if "/" in p else name, p) for p in patterns)

    def secret_allowed(self, namespace: str, name: str) -> bool:
        return self._named(self.secrets, namespace, name)

    def service_account_allowed(self, namespace: str, name: str) -> bool:
        return self._named(self.service_accounts, namespace, name)

    def milvus_allowed(self, uri: str) -> bool:
        u = urllib.parse.urlsplit(uri)
        if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
            return False
        host = u.hostname.lower()
        port = u.port or (443 if u.scheme == "https" else 19530)
        return any(fnmatch.fnmatchcase(f"{host}:{port}" if ":" in p else host, p.lower())
                   for p in self.milvus_hosts)

    def image_allowed(self, image: str) -> bool:
        return any(image.startswith(p) for p in self.images)

    # -- the whole spec
    def refusals(self, namespace: str, spec) -> list[str]:
        """What ``spec`` (an :class:`vsearch.operators.spec.IndexSpec`) asks for that this operator does
        not grant, one sentence each naming the flag that would allow it."""
        out = []
        if spec.token_secret and not self.secret_allowed(namespace, spec.token_secret[0]):
            out.append(f"spec.milvus.tokenSecretRef: Secret {spec.token_secret[0]!r} is not in the "
                       "operator's --allowed-secrets")
        if not self.milvus_allowed(spec.milvus_uri):
            out.append(f"spec.milvus.uri: {spec.milvus_uri} is not in the operator's --allowed-milvus-hosts")
        parts = [(p, getattr(spec, p)) for p in ("embedder", "ingest", "search")]
        if spec.training.enabled:            # the training pods: an image, an account, env like the others
            parts.append(("training", spec.training))
        for part, w in parts:
            if not self.image_allowed(w.image):
                out.append(f"spec.{part}.image: {w.image!r} is not under the operator's --allowed-images "
                           f"({', '.join(self.images) or 'none'})")
            if w.service_account and not self.service_account_allowed(namespace, w.service_account):
                out.append(f"spec.{part}.serviceAccountName: {w.service_account!r} is not in the operator's "
                           "--allowed-service-accounts")
            for i, env in enumerate(w.env):
                ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef")
                if ref is not None and not self.secret_allowed(namespace, str((ref or {}).get("name") or "")):
                    out.append(f"spec.{part}.env[{i}].valueFrom.secretKeyRef: Secret {(ref or {}).get('name')!r} "
                               "is not in the operator's --allowed-secrets")
        return out


def add_flags(f) -> None:
    """The allow-list flags of ``vsearch operator`` (a :class:`vsearch.core.config.Flags`)."""
    f.add("--allowed-secrets", default="",
          help="Secrets a SearchIndex may name (milvus.tokenSecretRef, env secretKeyRef): NAME or "
               "NAMESPACE/NAME, comma-separated shell patterns; default: none")
    f.add("--allowed-milvus-hosts", default="",
          help="Milvus hosts a SearchIndex may name (HOST or HOST:PORT patterns, comma-separated); "
               "default: none, so every SearchIndex is refused until this is set")
    f.add("--allowed-images", default="vsearch:",
          help="image prefixes the workloads may run (comma-separated)")
    f.add("--allowed-service-accounts", default="",
          help="serviceAccountName values the workloads may use: NAME or NAMESPACE/NAME patterns; default: none")
    f.add("--catalog-file-roots", default="",
          help="folders under which the quality gate may read file:// catalog images (comma-separated); "
               "default: none (the operator reads no local file)")
    f.add("--model-file-roots", default="",
          help="folders under which the learning loop may read a trained model's vsearch_model.json when "
               "spec.training.modelUri is a path (comma-separated); default: none (s3:// only)")
    f.add("--fetch-allow-networks", default="",
          help="CIDRs besides the public internet the gate may fetch http(s) images from")
