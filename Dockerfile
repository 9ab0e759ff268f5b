# sentinel-proxy: docker build -t sentinel-proxy . && docker run -p 8080:8080 sentinel-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SENTINEL_HOST=0.0.0.0 \
    SENTINEL_PORT=8080

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sentinel_proxy ./sentinel_proxy
RUN pip install . && useradd --system --uid 10001 --no-create-home sentinel
COPY config ./config

USER sentinel
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('SENTINEL_PORT', '8080')}/healthz\", timeout=2)"]
# SIGTERM drains open streams (server.shutdown_grace_seconds) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sentinel-proxy"]
