# deepmedix-data: the CPU image. Curation, cold-start synthesis with an API teacher, evaluation metrics (METEOR 1.5
# on Java), the Report Arena, the reader study app and the deploy step.
#
#   docker build -f images/data.Dockerfile -t ghcr.io/deepmedix/deepmedix-data:0.1.0 .     (or: make images)
#
# No ENTRYPOINT: KFP and Argo give the command (`deepmedix ...`, `python -m pipelines.argo exec ...`).
# The base image is a build argument: today's registry image by default, or a Python 3.11 base built from Debian
# packages without any registry (`make images BASE=debian`: images/debian-base.sh).
ARG BASE=docker.io/library/python:3.11.15-slim-bookworm
FROM ${BASE}
ARG BASE

ARG VERSION=0.1.0
# torch's CPU-only build (no CUDA libraries in this image). Empty: the index pip is configured with (the host's, as
# images/build.sh passes it), e.g. a mirror that carries the +cpu wheel.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="deepmedix-data" \
      org.opencontainers.image.description="DeepMedix-R1 CPU image: curation, cold-start synthesis, evaluation metrics, Report Arena, reader study, deploy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/deepmedix \
    PATH=/opt/venv/bin:$PATH

# Java for METEOR 1.5 (pycocoevalcap's jar). The JDK, not only the JRE: deepmedix.eval.meteor compiles its faster
# drop-in classes with javac on first use (the stock jar runs without it, slower). /usr/share/man/man1 is missing
# from slim images and the JDK's alternatives want it. Debian package versions are not pinned (the archive drops
# old ones); the base image tag pins the release.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends default-jdk-headless \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 deepmedix \
 && useradd --uid 1000 --gid 1000 --home-dir /home/deepmedix --create-home --shell /usr/sbin/nologin deepmedix \
 && python -m venv /opt/venv

WORKDIR /opt/deepmedix

# Every RUN that installs from a package index mounts the host's pip configuration and CA bundle as build secrets
# (images/build.sh writes them from the host's pip settings): pip reads /run/secrets/pip.conf through
# PIP_CONFIG_FILE, set for that command only. Secrets are not in any layer, nor in the image's history; a build
# without them (a plain `docker build`) uses pip's defaults.

# torch alone from its CPU index (no deps: they come from PyPI, under constraints.txt, with the rest)
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    pip install --no-cache-dir --no-deps ${TORCH_INDEX:+--index-url "${TORCH_INDEX}"} torch==2.13.0

# The dependencies next, in their own layer (kept while only the source changes); the reader app's FastAPI,
# uvicorn and Jinja2 are the serve extra without KServe (pinned by constraints.txt, which DL3013 cannot see).
COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/requirements.py
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    python images/requirements.py eval pipeline > /tmp/requirements.txt \
 && PIP_CONFIG_FILE=/run/secrets/pip.conf pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt fastapi uvicorn jinja2 \
 && rm /tmp/requirements.txt

# The project, installed editable: configs/ is read next to the package (deepmedix.config.CONFIG_DIR).
COPY README.md ./
COPY deepmedix/ deepmedix/
COPY serving/ serving/
COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    PIP_CONFIG_FILE=/run/secrets/pip.conf pip install --no-cache-dir -c constraints.txt -e '.[eval,pipeline]' \
 && deepmedix --help > /dev/null \
 && java -version

# Only $HOME is writable for uid 1000 (caches: ~/.cache/deepmedix, METEOR's classes and index, matplotlib).
USER 1000:1000
HEALTHCHECK NONE
CMD ["deepmedix", "--help"]
