#!/usr/bin/env bash
# What `bentoml serve` writes to disk, checked the way deploy/kubernetes/ runs it: every file system
# read-only except an empty /tmp and an empty BENTOML_HOME (the pod's two emptyDir volumes), HOME
# read-only, the pod's AEGAN_* settings (deploy/kubernetes/base/configmap.yaml).
#
#   1. in a private mount namespace (unshare --mount: nothing outside it changes), mount a fresh
#      tmpfs at /tmp and at BENTOML_HOME, then remount every other file system read-only;
#   2. start `bentoml serve` from this checkout, wait for /readyz, call every kind of endpoint
#      (one upload over 1 MiB, so it is spooled to disk) and /metrics: each must answer 200;
#   3. list every file then present under /tmp and BENTOML_HOME, with its size, and stop the server.
#
# Run it as root (a mount namespace needs it), from anywhere in a checkout with .venv set up:
#   sudo scripts/readonly-root-check.sh
#   AEGAN_CHECK_PORT=3998   port for the server
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$REPO/.venv/bin/python

if [[ "${1:-}" != --inside ]]; then
    [[ $EUID -eq 0 ]] || { echo "run as root: it needs a private mount namespace" >&2; exit 2; }
    work=$(mktemp -d /var/tmp/aegan-readonly.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/home/bentoml"
    # Uploads, made while the file system is writable: a 28x28 grey image, and a 1400x1400 RGB
    # noise PNG (over Starlette's 1 MiB in-memory limit for a form part, under AEGAN_MAX_UPLOAD_BYTES).
    "$PY" - "$work" <<'PY'
import sys
import numpy as np
from PIL import Image
Image.new("L", (28, 28), 128).save(f"{sys.argv[1]}/small.png")
noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
Image.fromarray(noise).save(f"{sys.argv[1]}/large.png")
PY
    unshare --mount --propagation private "$0" --inside "$work"
    exit
fi

work=$2
port=${AEGAN_CHECK_PORT:-3998}
export HOME=$work/home BENTOML_HOME=$work/home/bentoml TMPDIR=/tmp
export PYTHONDONTWRITEBYTECODE=1 BENTOML_DO_NOT_TRACK=True  # as in the image (Dockerfile)
# The pod's settings; AEGAN_MODEL names the image's path of the shipped bundle, the checkout's here.
eval "$("$PY" - "$REPO/deploy/kubernetes/base/configmap.yaml" <<'PY'
import shlex, sys, yaml
for key, value in yaml.safe_load(open(sys.argv[1]))["data"].items():
    if key != "AEGAN_MODEL":
        print(f"export {key}={shlex.quote(value)}")
PY
)"

mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs "$BENTOML_HOME"
while read -r target; do
    case "$target" in
        /proc | /proc/* | /sys | /sys/* | /dev | /dev/* | /tmp | "$BENTOML_HOME") ;;
        *) mount -o remount,bind,ro "$target" 2>/dev/null || true ;;
    esac
done < <(findmnt -rn -o TARGET | sed 's/\\x20/ /g')
for path in "$REPO" "$HOME"; do
    if touch "$path/.readonly-check" 2>/dev/null; then
        rm -f "$path/.readonly-check"
        echo "FAIL: $path is still writable" >&2
        exit 1
    fi
done
echo "read-only: every file system but /tmp and $BENTOML_HOME (AEGAN_WORKERS=$AEGAN_WORKERS)"

cd "$REPO"
.venv/bin/bentoml serve aegan_serve.service:AEGAN --host 127.0.0.1 --port "$port" \
    >/tmp/serve.log 2>&1 &
server=$!
stop() { kill "$server" 2>/dev/null && wait "$server" || true; }
trap stop EXIT
for _ in $(seq 120); do
    curl -sf "localhost:$port/readyz" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat /tmp/serve.log; echo "FAIL: the server exited" >&2; exit 1; }
    sleep 1
done

failed=0
call() {  # NAME PATH [curl arguments]: expect 200
    local name=$1 path=$2 status
    shift 2
    status=$(curl -s -o /dev/null -w '%{http_code}' "$@" "localhost:$port$path")
    printf '%-24s %s\n' "$name" "$status"
    [[ $status == 200 ]] || failed=1
}
json=(-X POST -H 'Content-Type: application/json')
call "GET /livez" /livez
call "GET /readyz" /readyz
call "POST /sample" /sample "${json[@]}" -d '{"n": 16, "seed": 1}'
call "POST /generate" /generate "${json[@]}" -d '{"n": 4, "seed": 1}'
call "POST /encode (large)" /encode -F "images=@$work/large.png" -F "images=@$work/small.png"
call "POST /reconstruct" /reconstruct -F "images=@$work/small.png"
call "POST /interpolate" /interpolate -F "images=@$work/large.png" -F "images=@$work/small.png"
call "POST /info" /info -X POST
call "GET /metrics" /metrics
call "GET /ui/" /ui/

echo "written under /tmp and BENTOML_HOME (bytes, path):"
find /tmp "$BENTOML_HOME" -mindepth 1 -not -name serve.log -printf '%s\t%p\n' | sort -k2
if grep -E "Traceback|Read-only file system" /tmp/serve.log; then
    failed=1
fi
stop
trap - EXIT
[[ $failed == 0 ]] && echo "OK" || { echo "FAIL" >&2; exit 1; }
