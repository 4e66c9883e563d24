# syntax=docker/dockerfile:1
# ingest as a container image: `docker build -t ingest:0.1.0 .` (see docs/operations.md).
#
# Stage "build" compiles ingest's C extension (INGEST_REQUIRE_C_EXTENSION=1: a failed compile
# fails the build instead of shipping a slower wheel) and collects the wheels of ingest and its
# dependencies; the final stage installs them from that folder with no compiler and no network.
# tests/test_install.py repeats these install steps (wheel built from the files COPY'd below,
# installed into a fresh environment, run as the installed package): this Dockerfile itself is
# not built by the test suite, as the machines that run it have no container engine.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY ingest ./ingest
COPY migrations ./migrations
COPY config ./config
ENV INGEST_REQUIRE_C_EXTENSION=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -c "import zipfile, glob; \
names = zipfile.ZipFile(glob.glob('/wheels/ingest-*.whl')[0]).namelist(); \
assert any(n.startswith('ingest/_copyenc.') and n.endswith('.so') for n in names), names; \
assert any(n.startswith('ingest/_migrations/') for n in names), names"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 ingest \
 && useradd --system --uid 10001 --gid ingest --create-home --home-dir /home/ingest \
      --shell /usr/sbin/nologin ingest
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels ingest \
 && python -c "import ingest.copyenc as c; assert c.available(), 'C extension missing'"
ENV PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/ingest
ENTRYPOINT ["ingest"]
CMD ["--help"]
