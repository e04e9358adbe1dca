#!/usr/bin/env bash
# Set up a fresh machine: Fashion-MNIST and Chromium (Debian packages), a virtual environment in
# .venv with the serving, training and development dependencies, torch pinned to its CPU build
# (constraints.txt).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the dataset, and Chromium with its driver for the browser tests of the explorer
# page (tests/test_ui_browser.py; they are skipped, with the reason, where the browser is missing).
packages=()
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${AEGAN_FASHION_MNIST_DIR:-}" ]; then
    packages+=(dataset-fashion-mnist)
fi
command -v chromium >/dev/null || packages+=(chromium)
command -v chromedriver >/dev/null || packages+=(chromium-driver)
# Redis for the tests of quotas shared across workers (tests/test_quotas.py starts its own).
command -v redis-server >/dev/null || packages+=(redis-server)
if [ ${#packages[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
    else
        echo "note: not installed: ${packages[*]} (Debian packages; run this script as root," \
             "or install them). Fashion-MNIST is needed for training and some tests (or set" \
             "AEGAN_FASHION_MNIST_DIR); without chromium the browser tests are skipped." >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras="train,dev,batch,ray"
# A machine whose NVIDIA driver lists a GPU also gets the CUDA and cuDNN libraries for ONNX Runtime
# (the gpu extra, several GB); without them the service would serve on the CPU.
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    extras="$extras,gpu"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
