# syntax=docker/dockerfile:1.7
# MISSRec recommendation service.
#   CPU image:  docker build -t missrec:cpu .
#   GPU image:  docker build --target gpu -t missrec:gpu .
#   run:        docker run -p 8000:8000 -v /path/to/bundle:/bundle:ro -v /path/to/clip-onnx:/clip:ro \
#                 -e MISSREC_CLIP_ONNX=/clip -e MISSREC_REDIS_URL=redis://redis:6379/0 missrec:cpu
# The bundle (from `missrec export` + `missrec build-index`) and the ONNX CLIP encoders (`missrec export-clip`) are
# mounted, never baked in. Settings are the same
# MISSREC_* environment variables as outside the container (see `missrec serve --help`, service/settings.py).
#
# Build arguments (the defaults are public; scripts/build_image.py sets them for a machine with a PyPI mirror only):
#   BASE_IMAGE       base of the build and cpu stages: any Debian bookworm with python3 (>= 3.11) and its venv
#                    module (python:3.11-slim-bookworm, or a debootstrapped bookworm + python3 python3-venv)
#   PIP_INDEX_URL    the package index (pip reads it from the environment the ARG sets)
# A private CA for the index: --secret id=pip_cert,src=/path/ca.pem (used as PIP_CERT when given).
# The Dockerfile's sha256 is recorded in docs/image-build.json by a real build (scripts/build_image.py); a test fails
# when they differ.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------
# build: a wheel of this project (no dependencies), so the runtime stages never see the source tree or build tools
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
WORKDIR /src
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY clip_features ./clip_features
COPY missrec ./missrec
COPY model_export ./model_export
COPY index_builder ./index_builder
COPY serving_core ./serving_core
COPY missrec_cli ./missrec_cli
COPY service ./service
COPY loadtest ./loadtest
COPY harness ./harness
COPY lifecycle ./lifecycle
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/build-venv/bin/python -m build --wheel --outdir /wheels

# ---------------------------------------------------------------------------------------------------------------
# cpu: serving dependencies only (ONNX Runtime, FAISS, FastAPI, Redis client), no torch: cold-start ingestion runs
# open_clip's encoders exported to ONNX (`missrec export-clip`), mounted at /clip; without them recommendations are
# served and /readyz says ingestion is unavailable. In a venv (/opt/venv): a Debian base's python3 is never touched.
FROM ${BASE_IMAGE} AS cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    MISSREC_BUNDLE=/bundle \
    MISSREC_DATA_DIR=/var/lib/missrec
COPY --from=build /wheels /wheels
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir "$(ls /wheels/*.whl)[serve]" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 missrec \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/missrec --create-home missrec
USER 10001:10001
WORKDIR /var/lib/missrec
VOLUME ["/bundle", "/clip"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["missrec"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------------------
# gpu: onnxruntime-gpu + FAISS GPU on CUDA 12 (MISSREC_ONNX_PROVIDER / MISSREC_FAISS_DEVICE default to auto)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS gpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MISSREC_BUNDLE=/bundle \
    MISSREC_DATA_DIR=/var/lib/missrec
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=build /wheels /wheels
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-cache-dir "$(ls /wheels/*.whl)[serve,ingest]" \
    && pip uninstall -y onnxruntime faiss-cpu \
    && pip install --no-cache-dir onnxruntime-gpu faiss-gpu-cu12 \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 missrec \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/missrec --create-home missrec
USER 10001:10001
WORKDIR /var/lib/missrec
VOLUME ["/bundle"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["missrec"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
