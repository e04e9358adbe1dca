#!/usr/bin/env bash
# Set up a fresh machine: Fashion-MNIST (Debian package), a virtual environment in .venv with the
# serving, training and development dependencies, torch pinned to its CPU build (constraints.txt).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${AEGAN_FASHION_MNIST_DIR:-}" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "note: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set" \
             "AEGAN_FASHION_MNIST_DIR (needed for training and for some tests)" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[train,dev]"
