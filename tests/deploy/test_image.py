"""The vsearch image: `vsearch --help` from the OCI archive of ``make image`` with podman, and
the Dockerfile's static checks (a pinned base, the build args ``make image`` passes, the CPU
build's torch check run with this machine's torch, the build context the ignore files let
through, the licence).

The build itself takes about 7 minutes here and is its own target (``make image``), not part of
``make test``; the archive test checks what that build left, and skips when there is none. A
plain ``docker build .`` needs a Docker daemon and the network, neither of which is here: it has
not been run."""

from __future__ import annotations

import json
import re
import shutil
import sys
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


# --------------------------------------------------------------------------- the Dockerfile, statically
# (a build takes minutes and network or the `make image` set-up; these run everywhere)

DOCKERFILE = REPO / "Dockerfile"
IMAGE_SH = REPO / ".ci" / "image.sh"


def dockerfile_text() -> str:
    """The Dockerfile with its line continuations joined, as BuildKit's parser reads it."""
    return re.sub(r"\\\n", "", DOCKERFILE.read_text())


def build_args() -> dict[str, str]:
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)(?:=(.*))?$", DOCKERFILE.read_text(), re.M)
            if m[2] is not None}


def test_the_dockerfile_parses_with_buildkits_parser():
    """The official parser (moby/buildkit's, in the `dockerfile` package; not a dependency of the
    project: skipped where it is not installed)."""
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser) to run this")
    cmds = dockerfile.parse_file(str(DOCKERFILE))
    assert [c.cmd for c in cmds if c.cmd == "FROM"] == ["FROM"] * 3
    assert cmds[-2].cmd == "ENTRYPOINT" and cmds[-1].cmd == "CMD"


def test_the_base_image_is_pinned():
    base = build_args()["BASE"]
    assert re.fullmatch(r"debian:bookworm-20\d{6}(-slim)?", base) or "@sha256:" in base, base
    assert re.search(r"^FROM \$\{BASE\} AS base$", DOCKERFILE.read_text(), re.M)


def test_make_image_passes_every_build_arg_it_relies_on():
    """`make image` builds offline: it must name its base and its wheels, never fall back on the
    Dockerfile's defaults (a Debian base from a registry, packages from the indexes)."""
    passed = set(re.findall(r"--build-arg (\w+)=", IMAGE_SH.read_text()))
    assert passed == {"BASE", "TORCH_VARIANT", "VERSION", "WHEELS"}, passed
    assert passed <= set(re.findall(r"^ARG (\w+)", DOCKERFILE.read_text(), re.M))


def _check_script() -> str:
    m = re.search(r'/opt/vsearch/bin/python -c "(import sys, torch.*?)" "\$TORCH_VARIANT"', dockerfile_text())
    assert m, "the Dockerfile no longer checks the torch variant it installed"
    return m[1]


def test_the_cpu_build_takes_torch_from_the_cpu_index_and_checks_it():
    text = dockerfile_text()
    assert "index=https://download.pytorch.org/whl/cpu" in text
    assert build_args()["TORCH_VARIANT"] == "cpu"
    # the check itself, run with this machine's CPU torch: passes for cpu, refuses it as cuda
    script = _check_script()
    ok = k8s.run([sys.executable, "-c", script, "cpu"])
    assert ok.returncode == 0, ok.stderr
    wrong = k8s.run([sys.executable, "-c", script, "cuda"])
    assert wrong.returncode != 0 and "TORCH_VARIANT=cuda but torch" in wrong.stderr, wrong.stderr


def _ignore_patterns(path) -> list[tuple[bool, re.Pattern]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = "".join(".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*")
                     for part in re.split(r"(\*\*)", pat))
        out.append((negate, re.compile(rx)))
    return out


def sent(rel: str, patterns) -> bool:
    """Whether a file goes into the build context (Docker's rules: the last matching pattern wins;
    a pattern matching a parent folder matches the file)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for negate, rx in patterns:
        if any(rx.fullmatch(c) for c in candidates):
            included = negate
    return included


def test_the_ignore_files_let_through_what_the_build_needs_and_nothing_else():
    ignore = REPO / ".containerignore"
    assert (REPO / ".dockerignore").read_text() == ignore.read_text(), \
        ".dockerignore (Docker) and .containerignore (podman) differ"
    patterns = _ignore_patterns(ignore)
    needed = ["pyproject.toml", "README.md", "LICENSE", "build/image/wheels-cpu/torch-2.13.0+cpu-cp311.whl",
              "vsearch/models/default/config.json", "vsearch/cli.py"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "vsearch").rglob("*.py") if "__pycache__" not in p.parts]
    for rel in needed:
        assert sent(rel, patterns), f"{rel} is left out of the build context"
    for rel in (".venv/bin/python", "tests/deploy/test_image.py", "charts/vsearch/values.yaml", "runs/x/model.safetensors",
                "build/k8s-tools/helm", "build/image/vsearch-0.1.0-cpu.oci.tar", "vsearch/core/__pycache__/store.cpython-311.pyc"):
        assert not sent(rel, patterns), f"{rel} goes into the build context"


def test_the_image_ships_the_apache_license():
    text = (REPO / "LICENSE").read_text()
    for line in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
                 "END OF TERMS AND CONDITIONS"):
        assert line in text
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    df = DOCKERFILE.read_text()
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in df and "COPY LICENSE " in df
