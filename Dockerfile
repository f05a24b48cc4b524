# syntax=docker/dockerfile:1.7
# MISSRec recommendation service.
#   CPU image:  docker build -t missrec:cpu .
#   GPU image:  docker build --target gpu -t missrec:gpu .
#   run:        docker run -p 8000:8000 -v /path/to/bundle:/bundle:ro -e MISSREC_REDIS_URL=redis://redis:6379/0 missrec:cpu
# The bundle (from `missrec export` + `missrec build-index`) is mounted, never baked in. Settings are the same
# MISSREC_* environment variables as outside the container (see `missrec serve --help`, service/settings.py).

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------------------
# build: a wheel of this project (no dependencies), so the runtime stages never see the source tree or build tools
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY missrec ./missrec
COPY model_export ./model_export
COPY index_builder ./index_builder
COPY serving_core ./serving_core
COPY missrec_cli ./missrec_cli
COPY service ./service
COPY loadtest ./loadtest
COPY harness ./harness
COPY lifecycle ./lifecycle
RUN python -m build --wheel --outdir /wheels

# ---------------------------------------------------------------------------------------------------------------
# cpu: serving dependencies only (ONNX Runtime, FAISS, FastAPI, Redis client) + CPU torch for open_clip ingestion
FROM python:${PYTHON_VERSION}-slim AS cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MISSREC_BUNDLE=/bundle \
    MISSREC_DATA_DIR=/var/lib/missrec
COPY --from=build /wheels /wheels
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" torch torchvision \
    && pip install --no-cache-dir "$(ls /wheels/*.whl)[serve,ingest]" \
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

# ---------------------------------------------------------------------------------------------------------------
# gpu: onnxruntime-gpu + FAISS GPU on CUDA 12 (MISSREC_ONNX_PROVIDER / MISSREC_FAISS_DEVICE default to auto)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS gpu
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
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[serve,ingest]" \
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
