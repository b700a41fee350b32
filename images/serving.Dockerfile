# deepmedix-serving: the KServe predictor (`python -m serving.server`) and the grounding transformer used with the
# vLLM runtime.
#
#   docker build -f images/serving.Dockerfile -t ghcr.io/deepmedix/deepmedix-serving:0.1.0 .    (or: make images)
#
# torch is PyPI's torch 2.13.0, the CUDA 13.0 build with its CUDA libraries as pip packages, so one image runs on
# CPU nodes and on GPU nodes (NVIDIA driver >= 580 there). A CPU-only, much smaller variant:
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg TORCH=torch==2.13.0+cpu
# No ENTRYPOINT: the InferenceService gives the command (manifests/, deepmedix.cluster.deploy).
# The base image is a build argument: today's registry image by default, or a Python 3.11 base built from Debian
# packages without any registry (`make images BASE=debian`: images/debian-base.sh).
ARG BASE=docker.io/library/python:3.11.15-slim-bookworm
FROM ${BASE}
ARG BASE

ARG VERSION=0.1.0
ARG TORCH_INDEX=https://pypi.org/simple
# "===": exactly the release 2.13.0 (PEP 440 arbitrary equality), PyPI's CUDA build; "==" would also take a local
# 2.13.0+cpu wheel from a find-links folder in the host's pip configuration (hadolint's DL3013 cannot see the pin).
ARG TORCH=torch===2.13.0

LABEL org.opencontainers.image.title="deepmedix-serving" \
      org.opencontainers.image.description="DeepMedix-R1 KServe predictor and grounding transformer (v1, v2, OpenAI-compatible routes)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/deepmedix \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid 1000 deepmedix \
 && useradd --uid 1000 --gid 1000 --home-dir /home/deepmedix --create-home --shell /usr/sbin/nologin deepmedix \
 && python -m venv /opt/venv

WORKDIR /opt/deepmedix

# Every RUN that installs from a package index mounts the host's pip configuration and CA bundle as build secrets
# (images/build.sh writes them from the host's pip settings): pip reads /run/secrets/pip.conf through
# PIP_CONFIG_FILE, set for that command only. Secrets are not in any layer, nor in the image's history; a build
# without them (a plain `docker build`) uses pip's defaults.

# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    pip install --no-cache-dir --no-deps ${TORCH_INDEX:+--index-url "${TORCH_INDEX}"} "${TORCH}"

COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/requirements.py
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    python images/requirements.py serve > /tmp/requirements.txt \
 && PIP_CONFIG_FILE=/run/secrets/pip.conf pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY deepmedix/ deepmedix/
COPY serving/ serving/
COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    PIP_CONFIG_FILE=/run/secrets/pip.conf pip install --no-cache-dir -c constraints.txt -e '.[serve]' \
 && python -m serving.server --help > /dev/null

# The InferenceService runs it with a read-only root filesystem and emptyDirs at /tmp and /var/cache/deepmedix.
USER 1000:1000
EXPOSE 8080
HEALTHCHECK NONE
CMD ["python", "-m", "serving.server", "--help"]
