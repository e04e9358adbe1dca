# The serving image: BentoML + ONNX Runtime, the service and the shipped model bundle. No torch.
#
#   docker build -t aegan-serve .
#   docker run --rm --gpus all -p 3000:3000 aegan-serve      # CUDA when a GPU is visible, else CPU
#
# The default base carries CUDA 13 and cuDNN 9, which onnxruntime-gpu 1.31 needs. Any Debian or
# Ubuntu base with python3 works as well (CPU only): --build-arg BASE_IMAGE=debian:bookworm
ARG BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BENTOML_HOME=/home/aegan/bentoml \
    BENTOML_DO_NOT_TRACK=True

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Serving dependencies only, pinned; a layer of its own so code changes do not reinstall them.
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install -r /tmp/requirements-serve.txt \
    && rm /tmp/requirements-serve.txt

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin aegan
WORKDIR /app
COPY aegan_core/ aegan_core/
COPY aegan_serve/ aegan_serve/
COPY models/ models/

USER aegan
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "aegan_serve.service:AEGAN", "--port", "3000", "--host", "0.0.0.0"]
