# vae-server on the CPU: ONNX Runtime alone, no PyTorch (`pip install .[cpu]`).
# docker-compose.yml builds it as vae-serving-server:latest (service vae-server). For
# Kubernetes, build it from the repository root tagged with the project's version
# (pyproject.toml), the tag that deploy/k8s/overlays/cpu pins:
#   docker build -f deploy/docker/server.Dockerfile -t vae-serving-server:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The whole package installs (vae_server imports the torch-free vae_core), but only the cpu
# extra's dependencies: no torch, no onnx.
# The dependencies first, in a layer of their own that pyproject.toml and constraints.txt alone
# decide: an edit of the sources then rebuilds only the last layers, not the download of every
# dependency. Empty package folders and README stand in for the sources in this throwaway
# install. The versions are constraints.txt's, those make test tests.
COPY pyproject.toml constraints.txt ./
RUN mkdir proto core export server client && touch README.md \
    && pip install -c constraints.txt ".[cpu]" && pip uninstall -y vae-serving
COPY README.md ./
COPY proto proto
COPY core core
COPY export export
COPY server server
COPY client client
RUN pip install --no-deps ".[cpu]" && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home vae
USER vae
WORKDIR /tmp

# Every flag of vae-server is also a VAE_ environment variable (docker-compose.yml sets them).
ENV VAE_MODEL_DIR=/models/default \
    VAE_PORT=50051 \
    VAE_METRICS_PORT=8000
EXPOSE 50051 8000
ENTRYPOINT ["vae-server"]
