# deepmedix-data: the CPU image. Curation, cold-start synthesis with an API teacher, evaluation metrics (METEOR 1.5
# on Java), the Report Arena, the reader study app and the deploy step.
#
#   docker build -f images/data.Dockerfile -t ghcr.io/deepmedix/deepmedix-data:0.1.0 .     (or: make images)
#
# No ENTRYPOINT: KFP and Argo give the command (`deepmedix ...`, `python -m pipelines.argo exec ...`).
FROM python:3.11.15-slim-bookworm

ARG VERSION=0.1.0
# torch's CPU-only build (no CUDA libraries in this image)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="deepmedix-data" \
      org.opencontainers.image.description="DeepMedix-R1 CPU image: curation, cold-start synthesis, evaluation metrics, Report Arena, reader study, deploy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.15-slim-bookworm"

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

# torch alone from its CPU index (no deps: they come from PyPI, under constraints.txt, with the rest)
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}" torch==2.13.0

# The dependencies next, in their own layer (kept while only the source changes); the reader app's FastAPI,
# uvicorn and Jinja2 are the serve extra without KServe.
COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/requirements.py
RUN python images/requirements.py eval pipeline > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt fastapi uvicorn jinja2 \
 && rm /tmp/requirements.txt

# The project, installed editable: configs/ is read next to the package (deepmedix.config.CONFIG_DIR).
COPY README.md ./
COPY deepmedix/ deepmedix/
COPY serving/ serving/
COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/
RUN pip install --no-cache-dir -c constraints.txt -e '.[eval,pipeline]' \
 && deepmedix --help > /dev/null \
 && java -version

# Only $HOME is writable for uid 1000 (caches: ~/.cache/deepmedix, METEOR's classes and index, matplotlib).
USER 1000:1000
HEALTHCHECK NONE
CMD ["deepmedix", "--help"]
