# syntax=docker/dockerfile:1
# One image for the API (default), the Celery workers, beat, the migration and the Triton
# repository export, chosen by command. deploy/README.md has the whole production picture.
#
#   docker build -t lpd .                                                         # CPU torch
#   docker build -t lpd-cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .  # CUDA torch
#
# Both variants use the same python:3.11-slim base. A CUDA build of torch carries its CUDA
# runtime in nvidia-* wheels and the NVIDIA Container Toolkit mounts the host driver at run
# time, so an nvidia/cuda base would only add a second copy of CUDA. PyPI's torch 2.14.1 for
# Linux is the CUDA 13 build (host driver >= 580); for an older driver pass a
# https://download.pytorch.org/whl/cu12x index instead.
#
#   docker run -p 8000:8000 --env-file .env lpd                                  # the API
#   docker run --env-file .env lpd python -m celery -A workers.celery_app worker -Q preprocess,events
#   docker run --env-file .env lpd python -m celery -A workers.celery_app beat -s /tmp/beat-schedule
#   docker run --env-file .env lpd python -m service.admin migrate

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the virtual environment from requirements.txt ---------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt ./
# torch and torchvision first, at requirements.txt's pins, from the variant's index; the full
# install then finds them satisfied (2.14.1+cpu satisfies ==2.14.1) and keeps them.
RUN python -m venv /opt/venv \
    && grep -E '^(torch|torchvision)==' requirements.txt > torch-requirements.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r torch-requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# The demo page's browser libraries (onnxruntime-web, mediapipe tasks-vision) at
# web/package-lock.json's pins, and the face detector model from the mediapipe wheel just
# installed, into /build/web/dist (what `make web` does). Debian's Node.js and npm stay in
# this stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm \
    && rm -rf /var/lib/apt/lists/*
COPY web/package.json web/package-lock.json web/build.mjs web/
RUN npm ci --prefix web --ignore-scripts --no-audit --no-fund \
    && node web/build.mjs --face-model \
        /opt/venv/lib/python3.11/site-packages/mediapipe/modules/face_detection/face_detection_short_range.tflite

# --- runtime: the venv, the code, a non-root user ----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="latent-pose-reenactment" \
      org.opencontainers.image.description="Head-reenactment API and Celery workers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      lpd.torch-index="${TORCH_INDEX_URL}"

# OpenCV (opencv-contrib-python, which mediapipe needs) links libGL, GLib and X11 client
# libraries even headless. Debian versions are not pinned: security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libsm6 libxext6 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group lpd \
    && mkdir -p /data/artifacts /data/served-avatars /triton \
    && chown -R 10001:10001 /data /triton

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /build/web/dist /app/web/dist

# Named volumes mounted on /data/* and /triton start out owned by the user above.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LPD_ARTIFACTS_DIR=/data/artifacts \
    LPD_SERVED_AVATARS_DIR=/data/served-avatars \
    LPD_BASE_CHECKPOINT=/app/checkpoints/demo-tiny-64.safetensors

# The code stays owned by root: the service cannot rewrite itself.
WORKDIR /app
COPY model/ model/
COPY media/ media/
COPY training/ training/
COPY service/ service/
COPY workers/ workers/
COPY deploy/ deploy/
COPY checkpoints/ checkpoints/
COPY samples/ samples/

USER 10001:10001
EXPOSE 8000

# Liveness of the API process (no curl in the image). Worker, beat and one-shot containers
# override or disable it (docker-compose.yml, deploy/k8s/).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# One process per container; scale with replicas. Stream limits are per process.
CMD ["python", "-m", "uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "20"]
