"""What every pod the operator creates has (the embedders, the ingest consumers, the training
runs): the `restricted` Pod Security Standard's security context as the image's user, a
read-only root filesystem with scratch volumes where writing is needed, and label values."""

from __future__ import annotations

import re

# The image's user (the Dockerfile's USER 10001). With these the pods meet the `restricted` Pod
# Security Standard, which the namespace of manifests/ enforces; none of them calls the
# Kubernetes API, so no service-account token is mounted.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
                      "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
# Writable places on the read-only root filesystem (the chart's vsearch.scratchVolumes).
SCRATCH_VOLUMES = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                   {"name": "data", "emptyDir": {"sizeLimit": "10Gi"}}]
SCRATCH_MOUNTS = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "data", "mountPath": "/var/lib/vsearch"}]


def label_value(text: str) -> str:
    v = re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63].strip("-._")
    return v or "x"
