# Images for sepconv-serve. Targets:
#   runtime-cpu    (default)  the API on ONNX Runtime CPU: no torch, non-root, tini, HEALTHCHECK
#   runtime-cuda              the API on onnxruntime-gpu, on an NVIDIA CUDA runtime base
#   model-builder             `python -m model build` with the CPU build of torch
# `--build-arg VARIANT=cuda` (or `--target runtime-cuda`) selects the CUDA API image.
#
# Base images are ARGs so that a machine without registry access can substitute local stand-ins
# (deploy/e2e.sh does). No `# syntax=` line on purpose: it would make BuildKit pull a frontend
# image; the built-in frontend (Docker >= 20.10) supports everything used here.
#
# Optional build secret `ca_bundle`: a CA bundle for pip, for networks that intercept TLS.
# Users on a plain network pass nothing.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG VARIANT=cpu

# ---------------------------------------------------------------- shared base for the CPU images
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid, so a volume the model builder writes (an emptyDir, a claim) is readable by the API.
RUN groupadd --system --gid 10001 sepconv \
 && useradd --system --uid 10001 --gid sepconv --home-dir /app --shell /usr/sbin/nologin sepconv \
 && mkdir -p /app /models \
 && chown sepconv:sepconv /models

# ---------------------------------------------------------------- serving venv (CPU): no torch
FROM python-base AS venv-cpu
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
# The model contract and the server only: no training code in the serving image. The `tracing`
# extra (OpenTelemetry SDK and OTLP exporters) so that SEPCONV_TRACING=true works in the image.
COPY sepconv ./sepconv
COPY service ./service
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/venv/bin/pip install ".[cpu,tracing]" \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null \
 && ! /opt/venv/bin/python -c "import model" 2>/dev/null

# ---------------------------------------------------------------- API image (CPU)
FROM python-base AS runtime-cpu
# tini is PID 1: it forwards SIGTERM to uvicorn (graceful shutdown) and reaps zombies.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv-cpu /opt/venv /opt/venv
# No model location: a deployment names one, SEPCONV_MODEL_REPOSITORY (a repository of versioned
# models: compose, the Kubernetes claim) or SEPCONV_MODEL_PATH (one file: KServe's /mnt/models),
# and setting both is refused, so an image default would be in every repository's way.
ENV PATH=/opt/venv/bin:$PATH \
    SEPCONV_HOST=0.0.0.0 \
    SEPCONV_PORT=8000 \
    SEPCONV_GRPC_PORT=8001
WORKDIR /app
USER 10001:10001
# HTTP, and gRPC (Open Inference Protocol; Triton's port).
EXPOSE 8000 8001
# Readiness, not liveness: the model must be loaded and warmed up. urllib, so no curl is needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEPCONV_PORT', '8000') + '/readyz', timeout=2)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------- CUDA base: Python on nvidia/cuda
FROM ${CUDA_IMAGE} AS cuda-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sepconv \
 && useradd --system --uid 10001 --gid sepconv --home-dir /app --shell /usr/sbin/nologin sepconv \
 && mkdir -p /app /models \
 && chown sepconv:sepconv /models

FROM cuda-base AS venv-cuda
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
# The model contract and the server only: no training code in the serving image.
COPY sepconv ./sepconv
COPY service ./service
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/venv/bin/pip install ".[gpu,tracing]" \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools

# ---------------------------------------------------------------- API image (CUDA)
FROM cuda-base AS runtime-cuda
COPY --from=venv-cuda /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    SEPCONV_HOST=0.0.0.0 \
    SEPCONV_PORT=8000 \
    SEPCONV_GRPC_PORT=8001 \
    SEPCONV_PROVIDER=cuda
WORKDIR /app
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SEPCONV_PORT', '8000') + '/readyz', timeout=2)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python3", "-m", "service"]

# ---------------------------------------------------------------- model builder (torch, CPU build)
FROM python-base AS model-builder
# The default training data: Debian's Fashion-MNIST IDX files (no download at run time).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
# torch's CPU build, pinned by its local version so no resolver can pick a CUDA build. It comes
# from PyTorch's CPU index, or from a torch wheel placed in ./wheels (offline build machines).
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,source=wheels,target=/wheels \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && if ls /wheels/torch-*.whl >/dev/null 2>&1; then \
      /opt/venv/bin/pip install --find-links /wheels "torch==${TORCH_VERSION}"; \
    else \
      /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
# The build imports the contract, never the server.
COPY sepconv ./sepconv
COPY model ./model
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/venv/bin/pip install ".[cpu,build]"
# build-model writes a repository (SEPCONV_MODEL_REPOSITORY) or one file (SEPCONV_MODEL_DIR).
COPY deploy/build-model.sh /usr/local/bin/build-model
ENV PATH=/opt/venv/bin:$PATH \
    SEPCONV_RECIPE=quick \
    SEPCONV_MODEL_DIR=/models
WORKDIR /app
USER 10001:10001
CMD ["build-model"]

# ---------------------------------------------------------------- default: the API image
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
