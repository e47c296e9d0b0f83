#!/usr/bin/env bash
# Build the Dockerfile's images with buildah (no Docker daemon), run the serving image and check it
# from outside the container.
#
# Usage (as root, from anywhere; Debian bookworm host with `apt-get install buildah debootstrap`):
#   deploy/build_images.sh            # base (cached) + serve image, then run it and check it
#   deploy/build_images.sh --train    # also build the train target (torch: large and slow) and
#                                     # serve a bundle that the train image trains and exports
#   deploy/build_images.sh --no-run   # build only
# Environment:
#   PYTHON       host interpreter with the project installed (default: .venv/bin/python, else python3)
#   MIRROR       Debian mirror for debootstrap (default: the first URI in /etc/apt/sources.list*)
#   BASE_IMAGE   stand-in base tag (default: localhost/ptmrec-base:bookworm)
#   PYTHON_IMAGE use this base instead of making one (e.g. python:3.11-slim where a registry answers)
#   BUD_ARGS     more `buildah bud` options, e.g. for a CPU-only torch in the train image:
#                BUD_ARGS="--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
#
# Steps, each idempotent:
#  1. Stand-in base: Docker Hub may be unreachable, so debootstrap makes a bookworm rootfs with
#     python3 3.11, python3-venv, python3-pip, python-is-python3 and ca-certificates, imported as
#     $BASE_IMAGE with PIP_BREAK_SYSTEM_PACKAGES=1 (Debian's pip refuses system installs otherwise).
#     Skipped when the image already exists.
#  2. `buildah bud --isolation chroot --layers --target serve` (and train with --train). The
#     machine's pip configuration (config files, the certificate, constraints and find-links / file://
#     index folders they name) is mounted read-only into every RUN step with -v, so pip inside the
#     build reaches the package registry the same way pip on the host does.
#  3. A synthetic bundle (bench.bundle_factory) goes to a temporary host folder; the image's
#     ENTRYPOINT runs under `buildah run --isolation chroot --network host` with the bundles mounted
#     at /srv/bundles (not the VOLUME path /bundles) and an API key file: the entrypoint binds
#     0.0.0.0, so the server runs authenticated rather than with --insecure-allow-anonymous.
#  4. From outside the container, the host's `python -m serve.client` checks health (SERVING), a
#     Recommend answer with the read key, that Recommend without it is refused and that metrics need
#     it; the script prints build times, image sizes and the time to SERVING, stops the server with
#     SIGTERM (it must exit 0) and removes the working container and the temporary folder.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-localhost/ptmrec-base:bookworm}
BUILD_TRAIN=0
RUN_SERVE=1
for arg in "$@"; do
  case $arg in
    --train) BUILD_TRAIN=1 ;;
    --no-run) RUN_SERVE=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install -y $tool" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "run as root (buildah --isolation chroot, debootstrap)" >&2; exit 1; }

log() { printf '[build_images %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
declare -A FIGURES=()
FIGURE_ORDER=()
figure() { FIGURES[$1]=$2; FIGURE_ORDER+=("$1"); log "$1: $2"; }
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

debian_mirror() {
  # The first Debian archive URI the host's apt uses (deb822 or one-line sources).
  local uri
  uri=$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v -- '-security' | head -n1 || true)
  [[ -n $uri ]] || uri=$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {
  # Step 1: the stand-in for python:3.11-slim.
  if image_exists "$BASE_IMAGE"; then
    log "base $BASE_IMAGE exists: kept"; figure base_build "cached"; return
  fi
  local mirror=${MIRROR:-$(debian_mirror)} rootfs mnt start
  rootfs=$(mktemp -d /var/tmp/ptmrec-rootfs.XXXXXX)
  ROOTFS=$rootfs
  start=$SECONDS
  log "debootstrap bookworm from $mirror into $rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  CTR=$(buildah from scratch)
  mnt=$(buildah mount "$CTR")
  tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . \
    | tar -C "$mnt" -xpf -
  buildah umount "$CTR" >/dev/null
  buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$CTR"
  buildah commit --rm "$CTR" "$BASE_IMAGE" >/dev/null
  CTR=""
  rm -rf "$rootfs"
  ROOTFS=""
  figure base_build "$((SECONDS - start)) s (debootstrap + import)"
}

pip_mounts() {
  # Step 2's -v options: the host's pip config files and every path they name that exists.
  "$PYTHON" - <<'EOF'
import configparser, os
from pathlib import Path

home = Path.home()
files = {Path("/etc/pip.conf"): Path("/etc/pip.conf"),
         Path("/etc/xdg/pip/pip.conf"): Path("/etc/xdg/pip/pip.conf"),
         home / ".pip/pip.conf": Path("/root/.pip/pip.conf"),
         home / ".config/pip/pip.conf": Path("/root/.config/pip/pip.conf")}
if os.environ.get("PIP_CONFIG_FILE"):
    files[Path(os.environ["PIP_CONFIG_FILE"])] = Path("/etc/pip.conf")
mounts = {}
for host, inside in files.items():
    if not host.is_file():
        continue
    mounts[host] = inside
    parser = configparser.ConfigParser()
    parser.read(host)
    for section in parser.sections():
        for key in ("cert", "client-cert", "constraint", "requirement", "find-links",
                    "index-url", "extra-index-url"):
            for word in parser.get(section, key, fallback="").split():
                path = Path(word.removeprefix("file://"))
                if path.is_absolute() and path.exists():
                    # an index URL's folder (…/simple) may link files elsewhere in its parent
                    path = path.parent if key.endswith("index-url") else path
                    mounts[path] = path
for host, inside in mounts.items():
    print(f"-v={host}:{inside}:ro")
EOF
}

build_target() {
  # Step 2: one Dockerfile target; figure NAME gets its build time.
  local target=$1 tag=$2 start
  start=$SECONDS
  log "buildah bud --target $target -t $tag (base $PYTHON_IMAGE)"
  buildah bud --isolation chroot --layers --format docker --target "$target" \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" "${MOUNTS[@]}" "${BUD_EXTRA[@]}" \
    -t "$tag" -f "$ROOT/Dockerfile" "$ROOT"
  figure "${target}_build" "$((SECONDS - start)) s"
  figure "${target}_size" "$(buildah images --format '{{.Size}}' "$tag" | head -n1)"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }  # seconds, 0.1

client() {
  (cd "$ROOT" && PYTHONPATH=$ROOT "$PYTHON" -m serve.client --target "127.0.0.1:$PORT" --timeout 3 "$@")
}

server_pid() {
  # The `python -m serve` process under `buildah run` PID (chroot isolation keeps the host's PIDs).
  local queue=("$1") p
  while (( ${#queue[@]} )); do
    p=${queue[0]}; queue=("${queue[@]:1}")
    if [[ $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null) =~ ^[^\ ]*python[0-9.]*\ -m\ serve\  ]]; then
      echo "$p"; return 0
    fi
    mapfile -t -O "${#queue[@]}" queue < <(ps -o pid= --ppid "$p" | tr -d ' ')
  done
  return 1
}

entrypoint() {
  # An image's ENTRYPOINT, one word a line.
  buildah inspect --type image --format '{{range .Docker.Config.Entrypoint}}{{println .}}{{end}}' "$1" \
    | sed '/^$/d'
}

train_bundle() {
  # With --train: the bundle the serving image loads is made by the train image: a synthetic
  # catalogue, `python -m train` (the image's ENTRYPOINT) on a miniature of configs/demo.yaml, export.
  local entry start
  mkdir -p "$TMP/work"
  cat > "$TMP/work/tiny.yaml" <<'YAML'
seed: 3
data: {path: /work/data}
encoders:
  image: {name: openclip_image, model: ptmrec-tiny, init_seed: 0}
  cache_dir: /work/cache
backbone: {name: lightgcn, embedding_size: 16, n_layers: 2}
heads: {modalities: [image]}
cold_start: {holdout_fraction: 0.1, ks: [10, 20]}
optim: {batch_size: 512, epochs: 3}
eval: {ks: [10, 20], patience: 5}
YAML
  chown -R 10001 "$TMP/work"                    # the image's `app` user
  mapfile -t entry < <(entrypoint ptmrec-train)
  CTR=$(buildah from ptmrec-train)
  start=$SECONDS
  log "train image: synthetic catalogue, ${entry[*]} --config tiny.yaml, export"
  if ! { buildah run --isolation chroot -v "$TMP/work:/work" "$CTR" -- python -m train.synthetic \
           --out /work/data --users 100 --items 60 --seed 5 \
      && buildah run --isolation chroot -v "$TMP/work:/work" "$CTR" -- "${entry[@]}" \
           --config /work/tiny.yaml --out /work/run \
      && buildah run --isolation chroot -v "$TMP/work:/work" "$CTR" -- python -m export \
           --run /work/run --bundles /work/bundles --factory Flat --publish; } > "$TMP/train.log" 2>&1
  then
    log "the train image failed; its log:"; cat "$TMP/train.log"; exit 1
  fi
  buildah rm "$CTR" >/dev/null
  CTR=""
  figure train_export "$((SECONDS - start)) s (100 users, 60 items, 3 epochs, CPU)"
  log "train image: $(tail -n 1 "$TMP/train.log")"
  mv "$TMP/work/bundles" "$TMP/bundles"
}

cleanup() {
  # On exit: stop a server still running, remove working containers and temporary folders.
  if [[ -n $RUN_PID ]] && kill -0 "$RUN_PID" 2>/dev/null; then
    kill -TERM "$(server_pid "$RUN_PID" || echo "$RUN_PID")" 2>/dev/null || true
    wait "$RUN_PID" || true
  fi
  if [[ -n $CTR ]]; then buildah rm "$CTR" >/dev/null 2>&1 || true; fi
  if [[ -n $TMP ]]; then rm -rf "$TMP"; fi
  if [[ -n $ROOTFS ]]; then   # a failed base build; never delete through a mount debootstrap left
    if grep -q " $ROOTFS/" /proc/mounts; then
      log "left $ROOTFS: mounts under it"
    else
      rm -rf "$ROOTFS"
    fi
  fi
}

prepare_run() {
  # Step 3's host side: a bundle (synthetic unless --train made one), a writable state folder,
  # a read key, two free ports.
  [[ -d $TMP/bundles ]] || (cd "$ROOT" && PYTHONPATH=$ROOT "$PYTHON" -c 'import sys; from pathlib import Path
from bench.bundle_factory import write_test_bundle
write_test_bundle(Path(sys.argv[1]))' "$TMP/bundles")
  mkdir -p "$TMP/state" "$TMP/secrets"
  chown 10001 "$TMP/state"                      # the image's `app` user
  chmod -R a+rX "$TMP/bundles"
  KEY=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf 'read:%s\n' "$KEY" > "$TMP/secrets/keys"
  chmod a+r "$TMP/secrets/keys"
  printf '%s' "$KEY" > "$TMP/client-key"
  PORT=$(free_port)
  METRICS=$(free_port)
}

run_serve() {
  # Steps 3 and 4: the serving image's entrypoint, checked from outside.
  local start entry stop status
  prepare_run
  CTR=$(buildah from ptmrec-serve)
  mapfile -t entry < <(entrypoint ptmrec-serve)   # later flags override its defaults (last wins)
  log "running ${entry[*]} + overrides on 0.0.0.0:$PORT (metrics $METRICS), bundles at /srv/bundles"
  start=$(date +%s.%N)
  buildah run --isolation chroot --network host \
    -v "$TMP/bundles:/srv/bundles:ro" -v "$TMP/state:/srv/state" \
    -v "$TMP/secrets/keys:/run/secrets/ptmrec-keys:ro" "$CTR" -- "${entry[@]}" \
    --bundles /srv/bundles --state /srv/state --port "$PORT" --metrics-port "$METRICS" \
    --api-keys /run/secrets/ptmrec-keys --log-level INFO > "$TMP/server.log" 2>&1 &
  RUN_PID=$!
  until client health >/dev/null 2>&1; do
    if ! kill -0 "$RUN_PID" 2>/dev/null || (( $(date +%s) - ${start%.*} > 300 )); then
      log "server never became SERVING; its log:"; cat "$TMP/server.log"; exit 1
    fi
    sleep 0.2
  done
  figure time_to_serving "$(since "$start") s (buildah run to health SERVING)"
  log "from outside: serve.client health -> $(client health)"
  log "from outside: serve.client --api-key-file KEY recommend --user 10 -k 5 ->"
  client --api-key-file "$TMP/client-key" recommend --user 10 -k 5
  if client recommend --user 10 -k 5 > "$TMP/anon.out" 2>&1; then
    log "recommend without a key was answered: authentication is off"; exit 1
  fi
  log "from outside: recommend without a key -> $(tail -n1 "$TMP/anon.out")"
  local url="http://127.0.0.1:$METRICS/metrics" anon keyed
  anon=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  keyed=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" "$url")
  log "metrics: HTTP $anon without the key, $keyed with it"
  [[ $anon == 401 && $keyed == 200 ]] || { log "metrics authentication is not as configured"; exit 1; }
  stop=$(date +%s.%N)
  kill -TERM "$(server_pid "$RUN_PID")"
  status=0
  wait "$RUN_PID" || status=$?
  RUN_PID=""
  figure sigterm_to_exit "$(since "$stop") s (exit status $status)"
  log "server log (last lines):"; tail -n 4 "$TMP/server.log"
  (( status == 0 )) || { log "the server did not stop cleanly"; exit 1; }
}

main() {
  cd "$ROOT"
  trap cleanup EXIT
  mapfile -t MOUNTS < <(pip_mounts)
  read -r -a BUD_EXTRA <<< "${BUD_ARGS:-}"
  log "pip mounts: ${MOUNTS[*]}"
  if [[ -n ${PYTHON_IMAGE:-} ]]; then
    figure base_build "given: $PYTHON_IMAGE"
  else
    make_base
    PYTHON_IMAGE=$BASE_IMAGE
  fi
  TMP=$(mktemp -d /var/tmp/ptmrec-run.XXXXXX)
  build_target serve ptmrec-serve
  figure base_size "$(buildah images --format '{{.Size}}' "$PYTHON_IMAGE" | head -n1)"  # now pulled
  if (( BUILD_TRAIN )); then build_target train ptmrec-train; train_bundle; fi
  if (( RUN_SERVE )); then run_serve; fi
  echo "figures:"
  for name in "${FIGURE_ORDER[@]}"; do printf '  %-16s %s\n' "$name" "${FIGURES[$name]}"; done
}

TMP="" CTR="" ROOTFS="" RUN_PID="" PORT="" METRICS="" KEY=""
main "$@"; exit $?   # parsed whole before it runs: editing the file mid-run is harmless
