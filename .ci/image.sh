#!/usr/bin/env bash
# Build the vsearch image without a Docker daemon and export it as an OCI archive.
#
#   .ci/image.sh [cpu|cuda]        (make image; make image VARIANT=cuda)
#
# Steps (each timed into build/image/timings-<variant>.tsv):
#   tools   apt-get install podman buildah runc mmdebstrap (when missing)
#   rootfs  a Debian bookworm rootfs (python3, python3-venv, ca-certificates, tini, libgomp1) by
#           mmdebstrap from this machine's apt sources, imported as localhost/vsearch-base:bookworm
#   wheels  every Python package the image needs, as wheels, into build/image/wheels-<variant>/
#           (CPU torch==2.13.0 from this machine's disk; the CUDA build from the package registry)
#   build   podman build (runtime runc, no network in the build: BASE and WHEELS given, so the
#           Dockerfile installs from the wheels with pip --no-index and needs no apt)
#   save    podman save --format oci-archive -> build/image/vsearch-<version>-<variant>.oci.tar
#   smoke   podman run of the archive: `vsearch --help`, the serve/ingest/operator help, the default model,
#           a non-root user, on a read-only root filesystem with every capability dropped
#
# Environment: FORCE_ROOTFS=1 rebuilds the base; KEEP_IMAGE=1 keeps the image in podman's store.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT="${1:-${VARIANT:-cpu}}"
case "$VARIANT" in cpu|cuda) ;; *) echo "variant must be cpu or cuda, not $VARIANT" >&2; exit 2;; esac
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
TAG="$VERSION"; [ "$VARIANT" = cpu ] || TAG="$VERSION-$VARIANT"
OUT=build/image
ARCHIVE="$OUT/vsearch-$VERSION-$VARIANT.oci.tar"
BASE_TAR="$OUT/rootfs-bookworm.tar"
BASE_IMAGE=localhost/vsearch-base:bookworm
IMAGE="localhost/vsearch:$TAG"
TIMINGS="$OUT/timings-$VARIANT.tsv"
mkdir -p "$OUT"
: > "$TIMINGS"

# runc, not crun, and explicit ulimits: crun and podman's default limits fail in this sandbox.
export CONTAINERS_CONF="$PWD/$OUT/containers.conf"
cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF

step() {  # step NAME COMMAND...: run, time, record
  local name="$1"; shift
  local t0; t0=$(date +%s.%N)
  echo "==> $name" >&2
  "$@"
  local dt; dt=$(echo "$(date +%s.%N) - $t0" | bc)
  printf '%s\t%.1f\n' "$name" "$dt" | tee -a "$TIMINGS" >&2
}

tools() {
  local missing=()
  for t in podman buildah runc mmdebstrap bc; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc mmdebstrap uidmap bc >/dev/null
}

rootfs() {
  if [ -s "$BASE_TAR" ] && [ -z "${FORCE_ROOTFS:-}" ] && podman image exists "$BASE_IMAGE"; then
    echo "reusing $BASE_TAR and $BASE_IMAGE (FORCE_ROOTFS=1 rebuilds them)" >&2; return 0
  fi
  if [ ! -s "$BASE_TAR" ] || [ -n "${FORCE_ROOTFS:-}" ]; then
    # No documentation, manual pages or translations in the image.
    mmdebstrap --quiet --variant=apt \
      --include=python3,python3-venv,ca-certificates,tini,libgomp1 \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      bookworm "$BASE_TAR" /etc/apt/sources.list.d/debian.sources
  fi
  podman import --quiet --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

wheels() {
  local dir="$OUT/wheels-$VARIANT"
  mkdir -p "$dir"
  rm -f "$dir"/vsearch-*.whl
  if [ "$VARIANT" = cpu ]; then
    # torch==2.13.0+cpu lies on this machine's disk (pip's find-links).
    "$PY" -m pip wheel -q --only-binary=torch -w "$dir" "torch==2.13.0" ".[runtimes]" >"$OUT/wheels-$VARIANT.log" 2>&1
  else
    # The registry's default torch 2.13.0 build is the CUDA one. This machine's pip settings
    # (find-links with the local +cpu wheel, a constraints file) are left out for this step.
    env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
      "$PY" -m pip wheel -q --only-binary=torch -w "$dir" "torch==2.13.0" ".[runtimes]" >"$OUT/wheels-$VARIANT.log" 2>&1
  fi
  if [ "$VARIANT" = cuda ] && ls "$dir"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    echo "the CUDA wheel set picked up a +cpu torch wheel" >&2; exit 1
  fi
  du -sh "$dir" >&2
}

build() {
  podman build --quiet --runtime runc --network=none \
    --build-arg BASE="$BASE_IMAGE" --build-arg TORCH_VARIANT="$VARIANT" --build-arg VERSION="$VERSION" \
    --build-arg WHEELS="$OUT/wheels-$VARIANT" \
    -f Dockerfile -t "$IMAGE" . >/dev/null
}

save() {
  rm -f "$ARCHIVE"
  podman save --quiet --format oci-archive -o "$ARCHIVE" "$IMAGE"
}

smoke() {
  # From the archive, as a cluster would run it: read-only root, /tmp writable, no capabilities.
  local run=(podman run --rm --network=host --read-only --tmpfs /tmp --cap-drop=ALL
             --security-opt no-new-privileges)
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  "${run[@]}" "oci-archive:$ARCHIVE" --help | grep -q '^usage: vsearch'
  "${run[@]}" --entrypoint /bin/sh "oci-archive:$ARCHIVE" -c '
    set -e
    test "$(id -u)" = 10001
    vsearch serve search --help >/dev/null
    vsearch serve embedder --help >/dev/null
    vsearch ingest --help >/dev/null
    vsearch operator --help >/dev/null
    vsearch delete-index --help >/dev/null
    test -s /usr/share/doc/vsearch/LICENSE
    vsearch model info /opt/vsearch/models/default | grep "\"name\": \"vsearch-default\"" >/dev/null
    python -c "import sys, torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); sys.exit(\"$1\" == \"cuda\" and torch.version.cuda is None)"
    ! command -v pip >/dev/null && ! command -v gcc >/dev/null && ! command -v cc >/dev/null
    echo "smoke: vsearch --help, serve/ingest/operator/delete-index help, default model, uid $(id -u), no pip or compiler"
  ' sh "$VARIANT" >&2
}

step tools tools
step rootfs rootfs
step wheels wheels
step build build
image_mib=$(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%d", $1/1048576}')
step save save
step smoke smoke
archive_mib=$(( $(stat -c %s "$ARCHIVE") / 1048576 ))
printf 'image_mib\t%s\narchive_mib\t%s\n' "$image_mib" "$archive_mib" | tee -a "$TIMINGS" >&2
if [ -z "${KEEP_IMAGE:-}" ]; then
  # The image lives on in the archive; the store keeps only the base (the CUDA build stage alone
  # is 9 GB).
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null 2>&1 || podman image prune -f >/dev/null 2>&1 || true
fi
echo "$ARCHIVE"
