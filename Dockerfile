# The one vsearch image: every workload (search service, embedder, ingest, operator, trainer)
# runs it with a different `vsearch` sub-command.
#
# Two ways to build it, the same Dockerfile:
#
#   docker build -t REGISTRY/vsearch:0.1.0 .          (Docker/BuildKit, podman; needs network)
#       The base is Debian bookworm at a dated tag; its packages come from apt, torch from
#       PyTorch's CPU wheel index (never the multi-GB CUDA build from PyPI), everything else from
#       PyPI, and the vsearch wheel is built from this checkout inside the build stage.
#       --build-arg TORCH_VARIANT=cuda (tag it 0.1.0-cuda): torch with CUDA from PyPI.
#
#   make image                                          (.ci/image.sh: podman, no network)
#       BASE is a Debian rootfs made by mmdebstrap with the same packages, WHEELS a folder of
#       wheels downloaded beforehand (build/image/wheels-<variant>/), installed with --no-index.
#
# Either way the build fails when the torch it installed is not the variant asked for
# (torch.version.cuda is None on cpu, set on cuda): a CPU image never becomes the CUDA one.
#
#   TORCH_VARIANT=cpu   (default) torch==2.13.0+cpu
#   TORCH_VARIANT=cuda  torch==2.13.0 with its CUDA libraries (nvidia-* wheels); the node's
#                       driver comes from the NVIDIA device plugin / container toolkit
#
# The final stage has no compiler, no pip and no wheels: only the Debian base (python3,
# ca-certificates, tini, libgomp1), the virtual environment, the default model and LICENSE.

# Debian 12 (bookworm) as published on 2025-12-29; its python3 is 3.11, as pyproject.toml requires.
ARG BASE=debian:bookworm-20251229-slim

FROM ${BASE} AS base
# The Debian packages the image runs on. The mmdebstrap base of `make image` has them all (and
# its build has no network); a plain Debian base gets the missing ones from apt.
RUN set -eu; missing=""; \
    for p in python3 python3-venv ca-certificates tini libgomp1; do \
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi

FROM base AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Where torch comes from without WHEELS: PyTorch's CPU index for cpu, PyPI (whose Linux build is
# the CUDA one) for cuda; set it for another index (a mirror, another CUDA version).
ARG TORCH_INDEX_URL=""
# A folder of the build context with every wheel the image needs (`make image`:
# build/image/wheels-<variant>); empty: build the vsearch wheel here, the rest from the indexes.
ARG WHEELS=""
# The checkout (pyproject.toml, the package folders, the default model) and, for `make image`,
# its wheels: what .containerignore / .dockerignore let through. vsearch is installed with its
# `runtimes` extra (ONNX Runtime and OpenVINO, for `--runtime onnxruntime|openvino`).
COPY . /src/
RUN set -eu; \
    case "$TORCH_VARIANT" in cpu|cuda) ;; *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 2;; esac; \
    python3 -m venv /opt/vsearch; \
    pip=/opt/vsearch/bin/pip; \
    if [ -n "$WHEELS" ]; then \
      ls "/src/$WHEELS"/vsearch-*.whl >/dev/null 2>&1 || { echo "WHEELS=$WHEELS holds no vsearch wheel" >&2; exit 1; }; \
      "$pip" install --no-cache-dir --no-index --find-links "/src/$WHEELS" 'vsearch[runtimes]'; \
    else \
      index="$TORCH_INDEX_URL"; \
      if [ -z "$index" ]; then \
        if [ "$TORCH_VARIANT" = cpu ]; then index=https://download.pytorch.org/whl/cpu; else index=https://pypi.org/simple; fi; \
      fi; \
      "$pip" install --no-cache-dir --index-url "$index" "torch==$TORCH_VERSION"; \
      "$pip" install --no-cache-dir '/src[runtimes]'; \
    fi; \
    /opt/vsearch/bin/python -c "import sys, torch, vsearch.cli; cuda = torch.version.cuda; print('torch', torch.__version__, 'cuda', cuda); \
sys.exit(0 if (cuda is None) == (sys.argv[1] == 'cpu') else f'TORCH_VARIANT={sys.argv[1]} but torch {torch.__version__} has cuda={cuda}: wrong torch build (see TORCH_INDEX_URL)')" "$TORCH_VARIANT"
# The default model ships inside the package (vsearch.models); /opt/vsearch/models/default
# links to it for commands that take a --model-dir.
RUN dest="$(/opt/vsearch/bin/python -c 'from vsearch.predictor.model_dir import default_model_dir; print(default_model_dir())')" \
 && test -f "$dest/config.json" \
 && mkdir -p /opt/vsearch/models && ln -s "$dest" /opt/vsearch/models/default \
 && /opt/vsearch/bin/pip uninstall -y -q pip \
 && find /opt/vsearch -name '__pycache__' -path '*/pip/*' -prune -exec rm -rf {} +

FROM base
ARG VERSION=0.1.0
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="vsearch" \
      org.opencontainers.image.description="Kubernetes-native visual search: search service, embedder, catalog ingest, rollout operator, trainer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.vsearch.torch-variant="${TORCH_VARIANT}"
# A fixed non-root user (numeric, so that runAsNonRoot can verify it); group 0 as OpenShift
# expects for arbitrary UIDs.
RUN echo 'vsearch:x:10001:0:vsearch:/var/lib/vsearch:/usr/sbin/nologin' >> /etc/passwd \
 && mkdir -p /var/lib/vsearch && chown 10001:0 /var/lib/vsearch && chmod 0775 /var/lib/vsearch
COPY --from=build /opt/vsearch /opt/vsearch
COPY LICENSE /usr/share/doc/vsearch/LICENSE
# Caches that libraries write go to /tmp: the chart mounts an emptyDir there and keeps the
# root filesystem read-only. Byte code was compiled at install time.
ENV PATH=/opt/vsearch/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/vsearch \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
WORKDIR /var/lib/vsearch
USER 10001:0
EXPOSE 8000 8080
# tini is PID 1: it forwards SIGTERM to vsearch (a Python PID 1 would ignore signals it has no
# handler for) and reaps the model server's worker processes.
ENTRYPOINT ["/usr/bin/tini", "--", "vsearch"]
CMD ["--help"]
