# The coalesce CQL sidecar. Build: docker build -t coalesce:0.1.0 .
# Run:   docker run --rm -p 9042:9042 coalesce:0.1.0 --upstream SCYLLA_HOST:9042
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY coalesce ./coalesce
# The sidecar needs no driver: only LZ4 (and uvloop, its faster event loop).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[sidecar,uvloop]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# Only the wheels built above, never the index: an unrelated "coalesce" is on PyPI.
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --shell /usr/sbin/nologin coalesce
USER 10001:10001
# Listen on every interface inside the container; metrics stay on loopback unless
# told otherwise (--metrics 0.0.0.0:9100 for probes and scrapers from outside).
ENV COALESCE_SIDECAR_LISTEN=0.0.0.0:9042 \
    COALESCE_SIDECAR_UVLOOP=true
EXPOSE 9042 9100
# /healthz answers 200 while an upstream node is reachable; urlopen raises otherwise.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]
ENTRYPOINT ["coalesce", "sidecar"]
