# syntax=docker/dockerfile:1
# The relay's image. Stage 1 builds the project's wheel and installs it with its dependencies into
# a virtual environment; the final stage copies only that environment onto the same base, so no
# compiler, build backend, pip or source tree reaches it. Both stages share BASE_IMAGE because a
# virtual environment points at its interpreter by absolute path.
#
#   docker build -t outbox-relay:0.1.0 .
#   buildah bud --isolation chroot --build-arg BASE_IMAGE=localhost/relay-base:bookworm-python3 .
#
# A TLS-intercepting proxy in front of PyPI: hand its CA bundle in as a build secret
# (--secret id=pip_ca,src=/path/ca.pem); secrets are mounted for one RUN and never stored.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# The extras installed with the relay: otel (spans, docs/tracing.md), compression (lz4 and zstd
# for kafka_compression_type) and console (`relay console`: the chart's and compose's console
# run this image). --build-arg EXTRAS= leaves them out; sqlalchemy, django and asyncpg belong in
# the application's environment, not in the relay's image.
ARG EXTRAS=otel,compression,console
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# .dockerignore lets in only pyproject.toml, README.md, relay/ and schemas/.
COPY . /src/
RUN --mount=type=secret,id=pip_ca \
    set -eu; cd /src; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -m venv /opt/relay; \
    /opt/relay/bin/pip wheel --no-deps --wheel-dir /wheels .; \
    wheel="$(echo /wheels/outbox_relay-*.whl)"; \
    /opt/relay/bin/pip install "${wheel}${EXTRAS:+[$EXTRAS]}"; \
    /opt/relay/bin/python -m compileall -q /opt/relay/lib; \
    /opt/relay/bin/pip uninstall -y pip setuptools >/dev/null 2>&1 || true; \
    rm -f /opt/relay/bin/pip /opt/relay/bin/pip3* /opt/relay/bin/Activate.ps1; \
    /opt/relay/bin/relay --help >/dev/null; \
    case ",$EXTRAS," in *,otel,*) /opt/relay/bin/python -c "import opentelemetry.trace";; esac; \
    case ",$EXTRAS," in *,compression,*) /opt/relay/bin/python -c "import lz4.frame, zstandard";; esac; \
    case ",$EXTRAS," in *,console,*) /opt/relay/bin/python -c "import relay.console.server";; esac

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG BASE_IMAGE
ARG EXTRAS=otel,compression,console
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay for PostgreSQL and Apache Kafka with a durable UNKNOWN state" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.outbox-relay.extras="${EXTRAS}"
COPY --from=build /opt/relay /opt/relay
# A numeric user (Kubernetes' runAsNonRoot can check a number, not a name), listed in /etc/passwd
# so that tools asking for the user's name get one; no home directory, no shell.
RUN echo "relay:x:10001:10001:outbox relay:/nonexistent:/usr/sbin/nologin" >> /etc/passwd && \
    echo "relay:x:10001:" >> /etc/group
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001
# The relay's /metrics, /healthz, /readyz (metrics_port) and the reconciler's (metrics_port + 1).
# metrics_host is left to the deployment: set RELAY_METRICS_HOST=0.0.0.0 to reach them from outside.
EXPOSE 9400 9401
ENTRYPOINT ["relay"]
CMD ["run"]
