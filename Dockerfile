# syntax=docker/dockerfile:1
#
# LIMoE Serve container images. Two final targets; `cpu` is the last stage, so it is the default:
#
#   docker build --target cpu -t limoe-serve:cpu .     # python:3.11-slim + onnxruntime (CPU)
#   docker build --target gpu -t limoe-serve:gpu .     # CUDA 12 + cuDNN 9 runtime + onnxruntime-gpu
#
#   docker run --rm -p 8000:8000 limoe-serve:cpu
#   docker run --rm -p 8000:8000 --gpus all limoe-serve:gpu   # needs the NVIDIA Container Toolkit
#
# Neither image contains torch: the service installs with the `serve` extra only and runs the
# ONNX backend. The default model (model_store/limoe-small) is baked in at /app/model_store; mount
# another store over it, or point LIMOE_MODEL_STORE elsewhere, to serve other models. Every
# setting is a LIMOE_* environment variable (see service/settings.py). The default ships int8
# graphs only (dynamic quantisation, a CPU technique): on the GPU image, serve an entry exported
# with fp32 graphs (`limoe export CKPT --name NAME --formats onnx`) for GPU speed.
#
# Both images run as the unprivileged user `limoe`, set numerically (USER 10001:10001) so that
# runtimes checking runAsNonRoot can verify it; the model store stays owned by root, so the
# service can read it but not change it.

# --------------------------------------------------------------------------------------------------
# GPU: build a virtual environment on the same base image the runtime stage uses, so the venv's
# python symlink (/usr/bin/python3, Ubuntu 24.04's Python 3.12) resolves identically in both.
# onnxruntime-gpu from PyPI is built against CUDA 12.x and cuDNN 9.x since 1.19 (CUDA 13 builds
# live on a separate feed), and CUDA 12 minor-version compatibility lets it run on this 12.6
# runtime; the upper bound keeps a future PyPI switch to CUDA 13 from slipping in unnoticed.
# --------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS gpu-build

ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3/python3-venv track the release's security updates; pinning their exact
# versions would only break the build when the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY limoe/ limoe/
COPY service/ service/

# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: remove the CPU wheel
# first, then install the GPU one (never the other way round, or the uninstall deletes its files).
# DL3013 misreads the local project ".[serve]" as an unpinned package; its pins are pyproject's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu>=1.20,<1.32"

# --------------------------------------------------------------------------------------------------
# GPU runtime image.
# --------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS gpu

ARG DEBIAN_FRONTEND=noninteractive
# Same reason as above: the distribution's python3 is the interpreter the venv was built with.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 limoe \
    && useradd --system --uid 10001 --gid limoe --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin limoe \
    && install -d -o 10001 -g 10001 /var/lib/limoe/jobs

COPY --from=gpu-build /opt/venv /opt/venv
WORKDIR /app
COPY model_store/ /app/model_store/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LIMOE_HOST=0.0.0.0 \
    LIMOE_PORT=8000 \
    LIMOE_MODEL_STORE=/app/model_store \
    LIMOE_JOBS_DIR=/var/lib/limoe/jobs \
    LIMOE_DEVICE=cuda

USER 10001:10001
EXPOSE 8000

# Liveness only (/readyz stays 503 while warming up). No curl in the image: use Python. The port
# follows LIMOE_PORT; urlopen raises on any non-2xx answer, which exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LIMOE_PORT', '8000'), timeout=4)"]

CMD ["limoe", "serve"]

# --------------------------------------------------------------------------------------------------
# CPU: build the virtual environment with the plain onnxruntime wheel (a core dependency).
# --------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu-build

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY limoe/ limoe/
COPY service/ service/
# DL3013 misreads the local project ".[serve]" as an unpinned package; its pins are pyproject's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]"

# --------------------------------------------------------------------------------------------------
# CPU runtime image (the default target: last stage).
# --------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu

RUN groupadd --system --gid 10001 limoe \
    && useradd --system --uid 10001 --gid limoe --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin limoe \
    && install -d -o 10001 -g 10001 /var/lib/limoe/jobs

COPY --from=cpu-build /opt/venv /opt/venv
WORKDIR /app
COPY model_store/ /app/model_store/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LIMOE_HOST=0.0.0.0 \
    LIMOE_PORT=8000 \
    LIMOE_MODEL_STORE=/app/model_store \
    LIMOE_JOBS_DIR=/var/lib/limoe/jobs \
    LIMOE_DEVICE=cpu

USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LIMOE_PORT', '8000'), timeout=4)"]

CMD ["limoe", "serve"]
