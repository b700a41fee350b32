# deepmedix-serving: the KServe predictor (`python -m serving.server`) and the grounding transformer used with the
# vLLM runtime.
#
#   docker build -f images/serving.Dockerfile -t ghcr.io/deepmedix/deepmedix-serving:0.1.0 .    (or: make images)
#
# torch is PyPI's torch==2.13.0, the CUDA 13.0 build with its CUDA libraries as pip packages, so one image runs on
# CPU nodes and on GPU nodes (NVIDIA driver >= 580 there). A CPU-only, much smaller variant:
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
# No ENTRYPOINT: the InferenceService gives the command (manifests/, deepmedix.cluster.deploy).
FROM python:3.11.15-slim-bookworm

ARG VERSION=0.1.0
ARG TORCH_INDEX=https://pypi.org/simple

LABEL org.opencontainers.image.title="deepmedix-serving" \
      org.opencontainers.image.description="DeepMedix-R1 KServe predictor and grounding transformer (v1, v2, OpenAI-compatible routes)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.15-slim-bookworm"

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

RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}" torch==2.13.0

COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/requirements.py
RUN python images/requirements.py serve > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY deepmedix/ deepmedix/
COPY serving/ serving/
COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/
RUN pip install --no-cache-dir -c constraints.txt -e '.[serve]' \
 && python -m serving.server --help > /dev/null

# The InferenceService runs it with a read-only root filesystem and emptyDirs at /tmp and /var/cache/deepmedix.
USER 1000:1000
EXPOSE 8080
HEALTHCHECK NONE
CMD ["python", "-m", "serving.server", "--help"]
