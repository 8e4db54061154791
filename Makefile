# The README's two commands are `make run` and `make test`; each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_DIR ?= models/default
RUN_DIR ?= runs/default
MNIST_TEST ?= ../shared/data/mnist
PYTEST_ARGS ?=

.PHONY: run test system-packages setup lock model eval bench bench-gpu profile soak lint typecheck proto clean

# A stamp file so set-up runs once, and again whenever pyproject.toml or constraints.txt
# changes.
# torch goes first and pinned: pip takes the CPU build on disk, never a multi-GB CUDA build.
# A machine without that wheel on disk names the CPU index instead:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# ONNX Runtime: the cpu extra (onnxruntime), or on a GPU machine ORT_EXTRA=gpu (onnxruntime-gpu;
# BENCHMARKS.md, "The GPU path"). The two share one import name and one folder: the other is
# uninstalled first (uninstalled after, it would take the shared files with it), and the stamp
# names the extra, so that switching sets up again; unnamed, the extra is the one .venv has.
ORT_EXTRA ?= $(if $(wildcard $(BIN)/.installed-gpu),gpu,cpu)
ifeq ($(filter $(ORT_EXTRA),cpu gpu),)
$(error ORT_EXTRA must be cpu or gpu, not $(ORT_EXTRA))
endif
OTHER_ORT := $(if $(filter gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu)
INSTALLED := $(BIN)/.installed-$(ORT_EXTRA)
# Every package set-up installs is pinned to the version constraints.txt names (Python 3.11,
# Linux), as the Docker images are: make test tests what they ship, and a new release on the
# registry changes nothing until `make lock` takes it. CONSTRAINTS= (empty) sets up unpinned.
# pip compiles every module it installs (the default, kept): where PYTHONDONTWRITEBYTECODE is
# set, as on this project's machines, a module pip left uncompiled would be compiled again on
# every import, by every process the tests start.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip uninstall -q -y $(OTHER_ORT) 2>/dev/null || true
	$(BIN)/pip install -q torch==2.13.0 $(PIN) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[$(ORT_EXTRA),train,dev,bulk]' $(PIN)
	rm -f $(BIN)/.installed $(BIN)/.installed-*
	touch $@

setup: $(INSTALLED)

# constraints.txt anew: the newest versions pyproject.toml allows, resolved by this set-up,
# unpinned, in a venv of its own (the cpu extra's ONNX Runtime; the GPU image pins
# onnxruntime-gpu itself).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) setup VENV=$(LOCK_VENV) ORT_EXTRA=cpu CONSTRAINTS=
	{ echo "# The version of every package make setup installs (Python 3.11, Linux), and the"; \
	  echo "# Docker images with it. Written by make lock; edit pyproject.toml, not this file."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf $(LOCK_VENV)

# The model is trained and exported only when its manifest is missing: a model directory
# that exists is served as it is, whether or not the run that made it is still here (an
# order-only prerequisite would still be built when missing, so the training is a step of
# this rule, skipped when the run's checkpoint exists).
$(MODEL_DIR)/manifest.json: | $(INSTALLED)
	test -f $(RUN_DIR)/checkpoint.pt || $(BIN)/vae-export train --out $(RUN_DIR)
	$(BIN)/vae-export onnx --run $(RUN_DIR) --out $(MODEL_DIR)

model: $(INSTALLED) $(MODEL_DIR)/manifest.json

# The ports are vae-server's defaults (50051, 8000), so that VAE_PORT and VAE_METRICS_PORT
# apply here too: a flag would win over them. The model is MODEL_DIR's, which make trains and
# exports when missing (VAE_MODEL_DIR does not change it: make run MODEL_DIR=...).
run: model
	$(BIN)/vae-server --model-dir $(MODEL_DIR)

# The default model too, as make run has it: a test checks it is EVAL.md's model, as exported.
# The tests that may share the machine run first on TEST_WORKERS processes (one per core by
# default), then the rest alone (scripts/test.sh); TEST_WORKERS=1 runs all in one process.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
test: model system-packages
	scripts/test.sh $(BIN)/python $(TEST_WORKERS) $(PYTEST_ARGS)

# Debian's packages the tests use (apt; independent of the venv, so make -j2 test installs
# them while pip sets up).
system-packages:
	scripts/system-packages.sh

# EVAL.md's figures of the default model: its generated digits judged by the classifier
# (trained first into runs/classifier when missing) and its likelihood with K = 1000.
eval: model
	$(BIN)/vae-export eval --model-dir $(MODEL_DIR) --data $(MNIST_TEST) --k 1000 \
		--samples 10000 --pictures docs/eval --json docs/eval/eval-k1000.json --roc docs/roc.png

# Throughput and latency beside the compute and transport limits, in one run (BENCHMARKS.md).
bench: model
	$(BIN)/python bench/run.py --model-dir $(MODEL_DIR)

# Where the server's time goes under make bench's three target loads: each thread's cores
# and py-spy's samples by where they lie (needs the right to trace a process: root, or
# kernel.yama.ptrace_scope = 0).
profile: model
	$(BIN)/python bench/profile_loads.py --model-dir $(MODEL_DIR)

# The GPU path: plain CUDA runs, IO binding and CUDA graphs, in process and served (needs
# ORT_EXTRA=gpu and a GPU: make setup ORT_EXTRA=gpu first; BENCHMARKS.md, "The GPU path").
bench-gpu: model
	$(BIN)/python bench/gpu.py --model-dir $(MODEL_DIR)

# A long mixed load on the real server (SOAK_MINUTES, 10 by default; not part of `make test`):
# fails on a lost, duplicated or wrong reply, an INTERNAL, or RSS growth of 5 % after warm-up.
SOAK_MINUTES ?= 10
soak: model
	$(BIN)/python bench/soak.py --model-dir $(MODEL_DIR) --minutes $(SOAK_MINUTES)

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy proto/vae_proto/tensor.py core/vae_core export/vae_export server/vae_server client/vae_client

# Regenerate the checked-in stubs after editing the .proto (a test fails when they differ).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/vae_proto/vae.proto

clean:
	rm -rf $(VENV) runs models
