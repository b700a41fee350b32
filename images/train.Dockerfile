# deepmedix-train: the CUDA image. Stage 1 SFT, cold start (teacher synthesis with a local model, SFT), GRPO,
# evaluation on a GPU; DeepSpeed ZeRO under torchrun, locally or in a Kubeflow Trainer TrainJob.
#
#   docker build -f images/train.Dockerfile -t ghcr.io/deepmedix/deepmedix-train:0.1.0 .    (or: make images)
#
# Python and CUDA come from the same places as in the other images: the Python 3.11 base (the registry's or one
# built from Debian packages, images/debian-base.sh), PyPI's CUDA 13.0 build of torch 2.13.0 with its CUDA libraries
# as nvidia-* wheels, and the CUDA compiler from PyPI too (cuda-toolkit[nvcc,cccl] at the release torch pins: nvcc,
# its crt headers, NVVM, the runtime headers and CCCL under site-packages/nvidia/cu13). No PPA, no nvidia/cuda
# image. DeepSpeed is installed with DS_BUILD_OPS=0: its ops (fused Adam, ...) are compiled on first use by that nvcc
# (its major release must match torch.version.cuda), with g++ from Debian. /usr/local/cuda links to the wheels'
# tree, so CUDA_HOME is the usual path. Needs an NVIDIA driver >= 580 on the nodes (CUDA 13.0).
#
# Shared memory: DataLoader workers and NCCL use /dev/shm, 64 MiB by default in a container. Run with
# `docker run --gpus all --shm-size=16g ...`; on Kubernetes mount a memory-backed emptyDir at /dev/shm (the Argo
# WorkflowTemplate, the KFP components and the TrainJob do).
#
# No ENTRYPOINT: KFP, Argo and the TrainJob give the command.

# The base image is a build argument: today's registry image by default, or a Python 3.11 base built from Debian
# packages without any registry (`make images BASE=debian`: images/debian-base.sh).
ARG BASE=docker.io/library/python:3.11.15-slim-bookworm
FROM ${BASE}
ARG BASE

ARG VERSION=0.1.0
# PyPI's torch 2.13.0 for linux x86_64 is the CUDA 13.0 build. "===": exactly the release 2.13.0 (PEP 440 arbitrary
# equality); "==" would also take a local 2.13.0+cpu wheel from a find-links folder in the host's pip configuration.
ARG TORCH_INDEX=https://pypi.org/simple
ARG TORCH=torch===2.13.0
# the CUDA compiler wheels of the CUDA release torch 2.13.0 requires (its cuda-toolkit==13.0.3 dependency)
ARG CUDA_TOOLKIT=cuda-toolkit[nvcc,cccl]==13.0.3
# vLLM (GRPO rollouts, TRL's colocate or server mode): WITH_VLLM=1 installs vllm 0.31.0 under the pin set of its
# own, images/constraints-vllm.txt (images/vllm_pins.py resolves and checks it with pip --dry-run): 0.31.0 is the
# release that fits both torch==2.13.0 (it pins it) and TRL 1.16 (vllm<=0.31.0); it needs transformers<5.18, so
# that image runs transformers 5.17.0 (constraints.txt elsewhere: 5.24.0). Without vLLM, GRPO generates with
# transformers (use_vllm: auto).
ARG WITH_VLLM=0

LABEL org.opencontainers.image.title="deepmedix-train" \
      org.opencontainers.image.description="DeepMedix-R1 CUDA image: SFT, cold start, GRPO (DeepSpeed), GPU evaluation" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/deepmedix \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    DS_BUILD_OPS=0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# g++ for the JIT builds (DeepSpeed ops, Triton; the base has Python's headers); Java for METEOR in evaluation (javac:
# its faster classes). /usr/share/man/man1 is missing from slim images and the JDK's alternatives want it. Debian
# package versions are not pinned (the archive drops old ones); the base image pins the release.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ default-jdk-headless \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 deepmedix \
 && useradd --uid 1000 --gid 1000 --home-dir /home/deepmedix --create-home --shell /usr/sbin/nologin deepmedix \
 && python -m venv /opt/venv

WORKDIR /opt/deepmedix

# Every RUN that installs from a package index mounts the host's pip configuration and CA bundle as build secrets
# (images/build.sh writes them from the host's pip settings): pip reads /run/secrets/pip.conf through
# PIP_CONFIG_FILE, set for that command only. Secrets are not in any layer, nor in the image's history; a build
# without them (a plain `docker build`) uses pip's defaults.

# torch alone (no deps: its CUDA libraries come from PyPI, under constraints.txt, with the rest), then the CUDA
# compiler wheels; /usr/local/cuda is their tree, with the lib64 and unversioned libcudart.so names that
# torch.utils.cpp_extension links against.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    pip install --no-cache-dir --no-deps ${TORCH_INDEX:+--index-url "${TORCH_INDEX}"} "${TORCH}" \
 && PIP_CONFIG_FILE=/run/secrets/pip.conf pip install --no-cache-dir "${CUDA_TOOLKIT}" \
 && cu=/opt/venv/lib/python3.11/site-packages/nvidia/cu13 \
 && ln -s "$cu" /usr/local/cuda \
 && ln -s lib "$cu/lib64" \
 && ln -s libcudart.so.13 "$cu/lib/libcudart.so" \
 && /usr/local/cuda/bin/nvcc --version

COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/constraints-vllm.txt images/
# the pin set this image is built under: constraints.txt, or with vLLM images/constraints-vllm.txt
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    if [ "${WITH_VLLM}" = "1" ]; then cp images/constraints-vllm.txt /opt/constraints.txt; \
    else cp constraints.txt /opt/constraints.txt; fi \
 && python images/requirements.py train eval pipeline > /tmp/requirements.txt \
 && if [ "${WITH_VLLM}" = "1" ]; then grep '^vllm==' /opt/constraints.txt >> /tmp/requirements.txt; fi \
 && PIP_CONFIG_FILE=/run/secrets/pip.conf \
    pip install --no-cache-dir -c /opt/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY deepmedix/ deepmedix/
COPY serving/ serving/
COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    pip install --no-cache-dir -c /opt/constraints.txt -e '.[train,eval,pipeline]' \
 && deepmedix --help > /dev/null \
 && python -c "import deepspeed, torch; assert torch.version.cuda and torch.version.cuda.startswith('13.'), torch.version.cuda"

RUN if [ "${WITH_VLLM}" = "1" ]; then python -c "import vllm, transformers; print(vllm.__version__, transformers.__version__)"; fi

# Only $HOME is writable for uid 1000 (~/.cache: deepmedix, Hugging Face, torch_extensions for DeepSpeed's JIT
# ops, Triton); mount a volume there for large checkpoints.
USER 1000:1000
HEALTHCHECK NONE
CMD ["deepmedix", "--help"]
