# syntax=docker/dockerfile:1
# One image for every datacreator service; the command picks the service:
#   docker run IMAGE serve generator      (planner | generator | curator | sink | all)
#   docker run IMAGE simulate-llm --host 0.0.0.0 --port 8080   (the HEALTHCHECK probes DATACREATOR_HTTP_PORT)
#
# Build arguments:
#   EXTRAS             optional extras, e.g. "embeddings" (torch + sentence-transformers: large) or "embeddings,export"
#   PIP_EXTRA_INDEX_URL an extra package index, e.g. one serving CPU-only torch wheels
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ARG EXTRAS=""
ARG PIP_EXTRA_INDEX_URL=""
# Build arguments reach RUN as environment variables, so pip sees PIP_EXTRA_INDEX_URL when set.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# Wheels of the package and all its dependencies; the runtime stage installs only these.
RUN if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi \
 && pip wheel --wheel-dir /wheels ".${EXTRAS:+[${EXTRAS}]}"

FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRAS=""
LABEL org.opencontainers.image.title="datacreator" \
      org.opencontainers.image.description="datacreator services: planner, generator, curator, sink and the LLM simulator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATACREATOR_HTTP_HOST=0.0.0.0 \
    DATACREATOR_HTTP_PORT=8080 \
    DATACREATOR_LOG_LEVEL=INFO \
    HF_HOME=/tmp/hf
# /data belongs to the service user, so a volume mounted there (the sink's files) is writable.
RUN groupadd --system --gid 10001 datacreator \
 && useradd --system --uid 10001 --gid datacreator --home-dir /app --create-home --shell /usr/sbin/nologin datacreator \
 && install -d -o 10001 -g 10001 /data
# Installed from the builder's wheels only (--no-index): the runtime stage never reaches a registry.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "datacreator${EXTRAS:+[${EXTRAS}]}"
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DATACREATOR_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["datacreator"]
CMD ["serve", "all"]
