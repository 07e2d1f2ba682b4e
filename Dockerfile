# The one vsearch image: every workload (search service, embedder, ingest, operator, trainer)
# runs it with a different `vsearch` sub-command.
#
# Built by `make image` (.ci/image.sh) without a Docker daemon and without network access in
# the build: the base is a Debian rootfs made by mmdebstrap and imported into podman, and every
# Python package comes from wheels downloaded beforehand into build/image/wheels-<variant>/.
#
#   TORCH_VARIANT=cpu   (default) torch==2.13.0+cpu
#   TORCH_VARIANT=cuda  torch==2.13.0 with its CUDA libraries (nvidia-* wheels); the node's
#                       driver comes from the NVIDIA device plugin / container toolkit
#
# The final stage has no compiler, no pip and no wheels: only the Debian base (python3,
# ca-certificates, tini, libgomp1), the virtual environment and the default model.

ARG BASE=localhost/vsearch-base:bookworm

FROM ${BASE} AS build
ARG TORCH_VARIANT=cpu
COPY build/image/wheels-${TORCH_VARIANT}/ /wheels/
# --no-index: nothing is fetched during the build; the wheel set decides what goes in.
RUN python3 -m venv /opt/vsearch \
 && /opt/vsearch/bin/pip install --no-cache-dir --no-index --find-links /wheels vsearch \
 && /opt/vsearch/bin/python -c "import torch, vsearch.cli; print('torch', torch.__version__)"
# The default model ships inside the package (vsearch.models); /opt/vsearch/models/default
# links to it for commands that take a --model-dir.
RUN dest="$(/opt/vsearch/bin/python -c 'from vsearch.predictor.model_dir import default_model_dir; print(default_model_dir())')" \
 && test -f "$dest/config.json" \
 && mkdir -p /opt/vsearch/models && ln -s "$dest" /opt/vsearch/models/default \
 && /opt/vsearch/bin/pip uninstall -y -q pip \
 && find /opt/vsearch -name '__pycache__' -path '*/pip/*' -prune -exec rm -rf {} +

FROM ${BASE}
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
