#!/usr/bin/env bash
# Container smoke test for the serving image, with no container daemon and no base-image registry:
#
#   1. bootstrap a Debian bookworm root file system with debootstrap and commit it as a local base
#      image (buildah from scratch + buildah commit);
#   2. build ./Dockerfile on it with buildah (vfs storage, chroot isolation);
#   3. run the image's CMD (host network; the port swapped for AEGAN_SMOKE_PORT), wait for /readyz
#      to answer 200, check that /sample returns a valid PNG and that the image's HEALTHCHECK passes;
#   4. remove the server, the containers, the images and the scratch files.
#
# Run it as root, from anywhere in a checkout:  scripts/container-smoke.sh
#
#   AEGAN_SMOKE_BUNDLE=DIR    bundle to ship as models/fashion-mnist (default: the repository's own)
#   AEGAN_SMOKE_PORT=3999     host port for the server
#   AEGAN_SMOKE_KEEP_BASE=1   keep the bootstrapped base image for the next run
#   DEBIAN_MIRROR=URL         debootstrap mirror (default: this host's Debian mirror, if it has one,
#                             else debootstrap's default)
#
# The build needs the Debian archive and the Python package index, nothing else.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${AEGAN_SMOKE_PORT:-3999}
BUNDLE=${AEGAN_SMOKE_BUNDLE:-$REPO/models/fashion-mnist}
BASE=localhost/aegan-smoke-base:bookworm
IMAGE=localhost/aegan-serve:smoke
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

log() { printf '[smoke %4ds] %s\n' "$(($(date +%s) - started))" "$*"; }
started=$(date +%s)
work=$(mktemp -d /tmp/aegan-smoke.XXXXXX)
container=""
server_pid=""

# The server's processes: its process tree and everything in that tree's mount namespaces (the
# server's workers start sessions of their own, so a process group would not reach them).
server_pids() {
    python3 - "$server_pid" <<'PY'
import os, sys

def parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None

def mount_ns(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None

pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
children = {}
for pid in pids:
    children.setdefault(parent(pid), []).append(pid)
tree, todo = set(), [int(sys.argv[1])]
while todo:
    pid = todo.pop()
    tree.add(pid)
    todo += children.get(pid, [])
spaces = {mount_ns(pid) for pid in tree} - {mount_ns(os.getpid()), None}
print(" ".join(str(pid) for pid in pids if pid in tree or mount_ns(pid) in spaces))
PY
}

cleanup() {
    local status=$? pids
    if [ -n "$server_pid" ]; then
        pids=$(server_pids)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086  # a list of process ids
            kill -TERM $pids 2>/dev/null || true
            for _ in $(seq 20); do  # until none is left but zombies
                ps -o stat= -p "${pids// /,}" 2>/dev/null | grep -qv '^Z' || break
                sleep 1
            done
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
    fi
    [ -n "$container" ] && buildah rm "$container" >/dev/null 2>&1 || true
    buildah rmi -f "$IMAGE" >/dev/null 2>&1 || true
    [ "${AEGAN_SMOKE_KEEP_BASE:-0}" = 1 ] || buildah rmi -f "$BASE" >/dev/null 2>&1 || true
    rm -rf "$work"
    if [ "$status" -eq 0 ]; then log "PASS"; else log "FAIL (exit $status)"; fi
}

trap cleanup EXIT

# --- tools -----------------------------------------------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (debootstrap and vfs storage need it)" >&2
    exit 2
fi
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing buildah and debootstrap"
    apt-get update -qq && apt-get install -y -qq buildah debootstrap >/dev/null
fi
if python3 -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $PORT)))"
then
    echo "port $PORT is already in use (set AEGAN_SMOKE_PORT)" >&2
    exit 2
fi
if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "no model bundle at $BUNDLE (export one, or set AEGAN_SMOKE_BUNDLE)" >&2
    exit 2
fi

# --- 1. base image ---------------------------------------------------------------------------------
host_mirror() {
    {
        grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
        grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}'
    } | grep -E '/debian/?$' | head -n 1
}
if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    log "reusing base image $BASE"
else
    mirror=${DEBIAN_MIRROR:-$(host_mirror || true)}
    log "debootstrap bookworm ${mirror:-(default mirror)}"
    rootfs="$work/rootfs"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" ${mirror:+"$mirror"} \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log"; exit 1; }
    # Trust the extra certificate authorities this host trusts (e.g. a TLS-inspecting proxy on the
    # way to the package index), and point pip at the system bundle instead of its own.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -cf "$work/rootfs.tar" .
    rm -rf "$rootfs"
    base_container=$(buildah from scratch)
    buildah add "$base_container" "$work/rootfs.tar" / >/dev/null
    buildah config --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd /bin/bash "$base_container"
    buildah commit --quiet --rm "$base_container" "$BASE" >/dev/null
    rm -f "$work/rootfs.tar"
    log "base image $BASE committed"
fi

# --- 2. build --------------------------------------------------------------------------------------
context="$work/context"
mkdir -p "$context/models"
cp -r "$REPO/aegan_core" "$REPO/aegan_serve" "$REPO/requirements-serve.txt" "$REPO/Dockerfile" "$REPO/.dockerignore" \
    "$context/"
cp -r "$BUNDLE" "$context/models/fashion-mnist"
log "buildah bud (BASE_IMAGE=$BASE)"
buildah bud --format docker --isolation chroot --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" \
    "$context" >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; exit 1; }
log "image $IMAGE built"

# --- 3. run and check ------------------------------------------------------------------------------
# The image's own CMD and HEALTHCHECK, with its port 3000 swapped for $PORT.
image_command() {  # $1: Cmd or Healthcheck
    buildah inspect --type image "$IMAGE" | python3 -c '
import json, sys
config = json.load(sys.stdin)["Docker"]["config"]
command = config["Cmd"] if sys.argv[1] == "Cmd" else config["Healthcheck"]["Test"][1:]
for arg in command:
    print(arg.replace("3000", sys.argv[2]))' "$1" "$PORT"
}
mapfile -t serve_command < <(image_command Cmd)
mapfile -t health_command < <(image_command Healthcheck)
if [ "${#serve_command[@]}" -eq 0 ] || [ "${#health_command[@]}" -eq 0 ]; then
    echo "the image has no CMD or no HEALTHCHECK" >&2
    exit 1
fi
container=$(buildah from "$IMAGE")
setsid buildah run --isolation chroot --network host "$container" -- "${serve_command[@]}" \
    >"$work/server.log" 2>&1 &
server_pid=$!
log "server starting on port $PORT"

python3 - "$PORT" "$server_pid" <<'EOF' || { tail -n 40 "$work/server.log"; exit 1; }
import json, os, struct, sys, time, urllib.error, urllib.request, zlib

port, server_pid = int(sys.argv[1]), int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 300
while True:
    try:
        if urllib.request.urlopen(base + "/readyz", timeout=5).status == 200:
            break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass
    try:
        os.kill(server_pid, 0)
    except ProcessLookupError:
        sys.exit("server exited before /readyz answered 200")
    if time.monotonic() > deadline:
        sys.exit("/readyz did not answer 200 within 300 s")
    time.sleep(2)
print("/readyz: 200")

request = urllib.request.Request(
    base + "/sample",
    data=json.dumps({"n": 4, "seed": 1}).encode(),
    headers={"Content-Type": "application/json"},
)
response = urllib.request.urlopen(request, timeout=60)
png = response.read()
assert response.status == 200, response.status
assert response.headers["Content-Type"] == "image/png", response.headers["Content-Type"]
assert png[:8] == b"\x89PNG\r\n\x1a\n", "no PNG signature"
offset, chunks, idat = 8, [], b""
while offset < len(png):
    (length,) = struct.unpack(">I", png[offset : offset + 4])
    kind, data = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
    (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
    assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
    chunks.append(kind)
    idat += data if kind == b"IDAT" else b""
    offset += 12 + length
assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", chunks
width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
rows = zlib.decompress(idat)
assert len(rows) == height * (1 + width * channels * depth // 8), "pixel data size"
print(f"/sample: valid PNG {width}x{height}, {channels} channel(s), X-Seed {response.headers['X-Seed']}")
EOF

buildah run --isolation chroot --network host "$container" -- "${health_command[@]}"
log "image HEALTHCHECK command passes"
log "elapsed $(($(date +%s) - started)) s"
