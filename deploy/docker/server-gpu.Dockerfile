# vae-server on an NVIDIA GPU: onnxruntime-gpu (`pip install .[gpu]`) on a CUDA + cuDNN base
# image, no PyTorch. docker-compose.yml builds it as vae-serving-server-gpu:latest (service
# vae-server-gpu, profile gpu). For Kubernetes, build it from the repository root tagged with
# the project's version (pyproject.toml), the tag that deploy/k8s/overlays/gpu pins:
#   docker build -f deploy/docker/server-gpu.Dockerfile -t vae-serving-server-gpu:0.1.0 .
# onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9: the base image must match.
# Needs the NVIDIA Container Toolkit on the host, and a driver for CUDA 13 there: 580 or later;
# CUDA 13 runs on Turing GPUs and later (compute capability 7.5 and up).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The gpu extra: onnxruntime-gpu (never beside onnxruntime) and nvidia-ml-py for the GPU
# metrics. The pin keeps onnxruntime-gpu on the CUDA major version of the base image.
# The dependencies first, in a layer of their own that pyproject.toml and constraints.txt alone
# decide: an edit of the sources then rebuilds only the last layers, not the download of every
# dependency. Empty package folders and README stand in for the sources in this throwaway
# install. The versions are constraints.txt's, those make test tests (resolved on
# Python 3.11; this image's is 3.12). onnxruntime-gpu and nvidia-ml-py are not among them.
COPY pyproject.toml constraints.txt ./
RUN mkdir proto core export server client && touch README.md \
    && pip install -c constraints.txt ".[gpu]" "onnxruntime-gpu==1.31.1" && pip uninstall -y vae-serving
COPY README.md ./
COPY proto proto
COPY core core
COPY export export
COPY server server
COPY client client
RUN pip install --no-deps ".[gpu]" && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home vae
USER vae
WORKDIR /tmp

ENV VAE_MODEL_DIR=/models/default \
    VAE_PORT=50051 \
    VAE_METRICS_PORT=8000 \
    VAE_PROVIDER=cuda
EXPOSE 50051 8000
ENTRYPOINT ["vae-server"]
