# deepmedix-train: the CUDA image. Stage 1 SFT, cold start (teacher synthesis with a local model, SFT), GRPO,
# evaluation on a GPU; DeepSpeed ZeRO under torchrun, locally or in a Kubeflow Trainer TrainJob.
#
#   docker build -f images/train.Dockerfile -t ghcr.io/deepmedix/deepmedix-train:0.1.0 .    (or: make images)
#
# Base: CUDA 13.0 *devel* on Ubuntu 22.04. torch 2.13.0's manylinux wheel on PyPI is its CUDA 13.0 build (it pulls
# the CUDA 13.0 runtime, cuDNN and NCCL as pip packages), and DeepSpeed is installed with DS_BUILD_OPS=0, so its ops
# (fused Adam, ...) are compiled on first use by nvcc, which must match torch's CUDA major version: hence the devel
# image of the same CUDA release. Needs an NVIDIA driver >= 580 on the nodes (CUDA 13.0).
#
# Shared memory: DataLoader workers and NCCL use /dev/shm, 64 MiB by default in a container. Run with
# `docker run --gpus all --shm-size=16g ...`; on Kubernetes mount a memory-backed emptyDir at /dev/shm (the Argo
# WorkflowTemplate, the KFP components and the TrainJob do).
#
# No ENTRYPOINT: KFP, Argo and the TrainJob give the command.
FROM nvidia/cuda:13.0.2-devel-ubuntu22.04

ARG VERSION=0.1.0
# PyPI's torch==2.13.0 for linux x86_64 is the CUDA 13.0 build
ARG TORCH_INDEX=https://pypi.org/simple
# vLLM (GRPO rollouts, TRL's colocate or server mode): WITH_VLLM=1 installs vllm 0.31.0 under the pin set of its
# own, images/constraints-vllm.txt (images/vllm_pins.py resolves and checks it with pip --dry-run): 0.31.0 is the
# release that fits both torch==2.13.0 (it pins it) and TRL 1.16 (vllm<=0.31.0); it needs transformers<5.18, so
# that image runs transformers 5.17.0 (constraints.txt elsewhere: 5.24.0). Without vLLM, GRPO generates with
# transformers (use_vllm: auto).
ARG WITH_VLLM=0

LABEL org.opencontainers.image.title="deepmedix-train" \
      org.opencontainers.image.description="DeepMedix-R1 CUDA image: SFT, cold start, GRPO (DeepSpeed), GPU evaluation" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:13.0.2-devel-ubuntu22.04"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/deepmedix \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    DS_BUILD_OPS=0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10); its -dev headers and g++ for the JIT builds
# (DeepSpeed ops, Triton); Java for METEOR in evaluation (javac: its faster classes). Debian/Ubuntu package
# versions are not pinned (the archives drop old ones); the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv g++ default-jdk-headless \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 deepmedix \
 && useradd --uid 1000 --gid 1000 --home-dir /home/deepmedix --create-home --shell /usr/sbin/nologin deepmedix \
 && python3.11 -m venv /opt/venv

WORKDIR /opt/deepmedix

# torch alone (no deps: its CUDA libraries come from PyPI, under constraints.txt, with the rest)
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}" torch==2.13.0

COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/constraints-vllm.txt images/
# the pin set this image is built under: constraints.txt, or with vLLM images/constraints-vllm.txt
RUN if [ "${WITH_VLLM}" = "1" ]; then cp images/constraints-vllm.txt /opt/constraints.txt; \
    else cp constraints.txt /opt/constraints.txt; fi \
 && python images/requirements.py train eval pipeline > /tmp/requirements.txt \
 && if [ "${WITH_VLLM}" = "1" ]; then grep '^vllm==' /opt/constraints.txt >> /tmp/requirements.txt; fi \
 && pip install --no-cache-dir -c /opt/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY deepmedix/ deepmedix/
COPY serving/ serving/
COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/
RUN pip install --no-cache-dir -c /opt/constraints.txt -e '.[train,eval,pipeline]' \
 && deepmedix --help > /dev/null \
 && python -c "import deepspeed, torch; assert torch.version.cuda and torch.version.cuda.startswith('13.'), torch.version.cuda"

RUN if [ "${WITH_VLLM}" = "1" ]; then python -c "import vllm, transformers; print(vllm.__version__, transformers.__version__)"; fi

# Only $HOME is writable for uid 1000 (~/.cache: deepmedix, Hugging Face, torch_extensions for DeepSpeed's JIT
# ops, Triton); mount a volume there for large checkpoints.
USER 1000:1000
HEALTHCHECK NONE
CMD ["deepmedix", "--help"]
