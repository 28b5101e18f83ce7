# syntax=docker/dockerfile:1
# vrai-stream on Debian bookworm slim with Debian's ffmpeg: the same ffmpeg the tests use.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
# Dependencies first, pinned with hashes: uv.lock's runtime part (no `local`, no `dev` extra),
# exported by the uv that wrote it and installed by pip. This layer changes only with the lock.
COPY pyproject.toml uv.lock /src/
RUN pip install uv==0.13.9 \
    && uv export --directory /src --frozen --no-dev --no-emit-project --no-header -q \
        -o /tmp/requirements.txt \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
COPY README.md /src/
COPY vrai_stream /src/vrai_stream
RUN /opt/venv/bin/pip install --no-deps /src

FROM python:3.11-slim-bookworm
# The python image ships its stdlib without .pyc files, and the service may not write them
# (PYTHONDONTWRITEBYTECODE, a non-root user): compile them once here, or every cold start
# compiles each stdlib module it imports (about 0.4 s of CPU, measured by .ci/prove-image).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin vrai \
    && python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    VRAI_TMP_DIR=/tmp \
    VRAI_DEBUG_DIR=/tmp/debug-copies
USER 10001
EXPOSE 8080
CMD ["vrai-stream", "serve", "--host", "0.0.0.0", "--port", "8080"]
