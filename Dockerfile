# Tollgate's image: the gateway, its CLI and the simulated worker, with the Llama 3 tokenizer (shipped inside the
# llama-models package) and the dashboard's assets. Non-root (uid and gid 10001, as the Helm chart expects); writes
# only to the spool directory and the temporary directory, so it runs on a read-only root filesystem; logs JSON to
# stdout; GET /healthz is the healthcheck.
#
#   docker build -t tollgate .
#   docker run -p 8080:8080 -e TOLLGATE_REDIS__URL=redis://redis:6379/0 -e TOLLGATE_POOLS__BF16__WORKERS=... tollgate

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY billing billing
COPY config config
COPY gateway gateway
RUN python -m venv /opt/tollgate && /opt/tollgate/bin/pip install .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 tollgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tollgate \
    && mkdir -p /var/lib/tollgate/spool \
    && chown -R tollgate /var/lib/tollgate
COPY --from=build /opt/tollgate /opt/tollgate
ENV PATH=/opt/tollgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOLLGATE_SERVER__HOST=0.0.0.0 \
    TOLLGATE_SERVER__PORT=8080 \
    TOLLGATE_LEDGER__SPOOL_DIR=/var/lib/tollgate/spool
USER tollgate
WORKDIR /var/lib/tollgate
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["tollgate", "serve"]
