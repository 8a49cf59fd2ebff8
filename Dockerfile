# syntax=docker/dockerfile:1
#
# lis-async: drop-in image for opencti-connector-lastinfosec-enrichment.
#
#   docker build -t lis-async:latest .
#   docker run --env-file connector.env lis-async:latest          # starts the worker ("run")
#   docker run -v $PWD/config.yml:/opt/opencti-connector-lastinfosec-enrichment/config.yml:ro \
#       lis-async:latest                                          # or with a mounted config.yml
#   docker run lis-async:latest check                             # validate settings + reachability
#   docker build --build-arg PYCTI_VERSION=6.8.9 -t lis-async:6.8.9 .  # the pycti of your OpenCTI
#
# Every package comes from a pinned set: constraints.txt (the default pycti), or
# constraints/pycti-$PYCTI_VERSION.txt (`bash .ci/pin <version>` writes one). The build fails
# when there is no pinned set for the requested pycti.
#
# The base image of every stage is to be pinned by digest (python:3.12-slim@sha256:...), so that
# a rebuild gets the same bytes. NOT PINNED YET: no registry was reachable where this was
# written, and a digest is never typed by hand. `bash .ci/pin-base` resolves it and rewrites the
# FROM lines; run it again to refresh the pin (Python or Debian security releases, monthly).

# --- builder: wheels of the project and of every dependency ------------------------------------
FROM python:3.12-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Empty: the pycti pinned in constraints.txt. Else a version with constraints/pycti-<it>.txt.
ARG PYCTI_VERSION=

WORKDIR /src
# README.md is needed: pyproject's `readme` points at it.
COPY pyproject.toml README.md constraints.txt ./
COPY constraints ./constraints
COPY lis_async ./lis_async
# Every runtime dependency ships manylinux wheels for CPython 3.12 (amd64 and arm64), so no
# compiler is needed here either; `pip wheel` takes the pinned versions (PIP_CONSTRAINT also
# pins setuptools and wheel in the isolated build of lis-async's own wheel) and the final stage
# installs offline from /wheels, with the same constraints.
# The demo extra's wheels too, for the `demo` stage only (bind-mounted, never in a layer).
RUN pins=constraints.txt \
    && if [ -n "$PYCTI_VERSION" ]; then pins="constraints/pycti-$PYCTI_VERSION.txt"; fi \
    && if [ ! -f "$pins" ]; then echo "no pinned set for pycti $PYCTI_VERSION: run bash .ci/pin $PYCTI_VERSION" >&2; exit 1; fi \
    && PIP_CONSTRAINT="$pins" pip wheel --wheel-dir /wheels -c "$pins" '.[demo]' \
    && cp "$pins" /wheels/constraints.txt

# --- demo: `docker build --target demo` (compose profile "demo"); never the default ------------
FROM python:3.12-slim AS demo

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels -c /wheels/constraints.txt 'lis-async[demo]' \
    && if python -c "import importlib.util as u, sys; sys.exit(u.find_spec('magic') is None)"; then \
        apt-get update && apt-get install -y --no-install-recommends libmagic1 \
        && rm -rf /var/lib/apt/lists/*; fi \
    && lis-async --help >/dev/null \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin connector
USER 10001:10001
ENTRYPOINT ["lis-async"]
CMD ["demo"]

# --- runtime (the default target, the last stage): what `run` and `check` need ----------------
FROM python:3.12-slim AS runtime

ENV CONNECTOR_TYPE=INTERNAL_ENRICHMENT \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheels are bind-mounted from the builder, not copied: they never land in an image layer.
# Only what `run` and `check` need: no extras, and the simulators and the benchmark
# (lis_async/sim, lis_async/bench: tools for the demo, the tests and `lis-async bench`) are
# removed from the installed package; `run` and `check` never import them.
# pycti 6.x imports python-magic, which needs libmagic (Debian's libmagic1) when it is imported:
# installed when the chosen pycti brought python-magic (pycti 7 does not). Then the image proves
# it starts: the command line, and every module `run` and `check` import (pycti included).
# Last, the installer goes too: nothing in the running container can fetch and install code.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels -c /wheels/constraints.txt lis-async \
    && site=$(python -c "import lis_async, os; print(os.path.dirname(lis_async.__file__))") \
    && rm -rf "$site/sim" "$site/bench" \
    && if python -c "import importlib.util as u, sys; sys.exit(u.find_spec('magic') is None)"; then \
        apt-get update && apt-get install -y --no-install-recommends libmagic1 \
        && rm -rf /var/lib/apt/lists/*; fi \
    && lis-async --help >/dev/null && lis-async health --help >/dev/null \
    && python -c "import lis_async.app, lis_async.check, lis_async.ops.logs" \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin connector \
    && pip uninstall -y pip setuptools wheel

# The upstream path: `lis-async run` reads ./config.yml, i.e.
# /opt/opencti-connector-lastinfosec-enrichment/config.yml when it is mounted.
WORKDIR /opt/opencti-connector-lastinfosec-enrichment

USER 10001:10001

# 9096: /healthz and /readyz (connector.health_port); 9095: /metrics (connector.metrics_port,
# served only when CONNECTOR_EXPOSE_METRICS=true).
EXPOSE 9095 9096

# The health server starts once the connector is registered: give it a start period.
# `lis-async health` asks /healthz (standard library only): it follows CONNECTOR_HEALTH_PORT
# (0 = disabled = always healthy) and CONNECTOR_HEALTH_HOST (a wildcard address is asked on
# 127.0.0.1) when set in the environment, else 9096; values changed only in config.yml are not
# seen here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["lis-async", "health"]

ENTRYPOINT ["lis-async"]
CMD ["run"]
