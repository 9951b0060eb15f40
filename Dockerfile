# keepwarm container image. Run and mount: docs/deploy.md. Checked by tests/test_deploy_docker.py
# (hadolint, and the ENTRYPOINT/CMD and HEALTHCHECK below run as processes against the emulator).
#
# Nothing secret or site-specific is baked in: mount the config at /etc/keepwarm (keepwarm.yaml
# with `metrics: {listen: "0.0.0.0:9464"}`, prompts beside it) and the API key as the file
# /run/secrets/keepwarm/anthropic_api_key.

# Both stages use the same pinned base, so the virtualenv's interpreter path holds in the final
# stage; bump both together, deliberately (and pin by digest in your registry). The tag is written
# out rather than passed as an ARG so that hadolint can check it.
FROM python:3.11.13-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY keepwarm ./keepwarm
# A self-contained virtualenv; the final stage copies it whole, without pip's caches or the source.
# Bytecode is compiled here (pip's default): the final root filesystem may be read-only.
RUN python -m venv /opt/keepwarm \
 && /opt/keepwarm/bin/pip install . \
 && /opt/keepwarm/bin/keepwarm --help > /dev/null

FROM python:3.11.13-slim-bookworm
# MALLOC_ARENA_MAX=2: at most two glibc malloc arenas for the ping worker threads instead of up
# to 8 per core of the node; 4 to 5 MB less resident at 10,000 pairs (docs/performance.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PATH=/opt/keepwarm/bin:$PATH \
    CREDENTIALS_DIRECTORY=/run/secrets/keepwarm \
    STATE_DIRECTORY=/var/lib/keepwarm
# A fixed numeric user (10001, as in deploy/kubernetes) so runAsNonRoot can check it and a
# mounted volume can be chowned to it; its home is the ledger's directory.
RUN useradd --system --no-log-init --uid 10001 --user-group \
        --home-dir /var/lib/keepwarm --shell /usr/sbin/nologin keepwarm \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/keepwarm
COPY --from=builder /opt/keepwarm /opt/keepwarm
USER 10001:10001
WORKDIR /var/lib/keepwarm
# The state (the ledger, /var/lib/keepwarm/ledger.db, kept there by default through
# $STATE_DIRECTORY) outlives the container: mount a volume here, or every restart starts
# without state and pings every pair within its TTL's margin.
VOLUME ["/var/lib/keepwarm"]
EXPOSE 9464
# /healthz is liveness: 200 while the process and its scheduler's heartbeat run, whatever the
# API does, so a slow or failing API never makes the container unhealthy (late pings are
# /readyz's business). urllib: the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
# Exec form: keepwarm is PID 1 and gets SIGTERM itself; it installs its own handler (a Python
# PID 1 has no default action for SIGTERM), lets in-flight pings finish and exits 0.
# SIGHUP reloads the config (docker kill --signal=HUP).
ENTRYPOINT ["keepwarm"]
CMD ["run", "--config", "/etc/keepwarm/keepwarm.yaml"]
