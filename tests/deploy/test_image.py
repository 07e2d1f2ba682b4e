"""The vsearch image (``make image``): `vsearch --help` from the OCI archive with podman.

The build itself takes about 7 minutes here and is its own target (``make image``), not part of
``make test``; this test checks the archive that build left, and skips when there is none."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest

from tests.deploy import k8s
from tests.deploy.k8s import REPO
from vsearch.predictor.model_dir import default_model_dir, read_meta

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
ARCHIVE = REPO / "build" / "image" / f"vsearch-{VERSION}-cpu.oci.tar"
CONF = REPO / "build" / "image" / "containers.conf"


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (make image installs it)")
@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"no image archive at {ARCHIVE.relative_to(REPO)} (run make image)")
def test_vsearch_help_runs_from_the_image_archive(monkeypatch):
    if CONF.exists():
        monkeypatch.setenv("CONTAINERS_CONF", str(CONF))
    res = k8s.run(["podman", "run", "--rm", "--network=host", "--read-only", "--tmpfs", "/tmp",
                   "--cap-drop=ALL", "--security-opt", "no-new-privileges", f"oci-archive:{ARCHIVE}", "--help"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: vsearch")
    for command in ("serve", "ingest", "train", "operator", "delete-index"):
        assert command in res.stdout
    # the image serves the repository's default model (the one the chart's values name)
    info = k8s.run(["podman", "run", "--rm", "--network=host", "--read-only", "--tmpfs", "/tmp",
                    f"oci-archive:{ARCHIVE}", "model", "info", "/opt/vsearch/models/default"])
    assert info.returncode == 0, info.stderr
    meta = json.loads(info.stdout)
    repo = read_meta(default_model_dir())
    assert (meta["name"], meta["version"], meta["embedding_dim"]) == (repo.name, repo.version, repo.embedding_dim)
