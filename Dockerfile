# tcpecho in a container: `tcpecho serve` runs as PID 1 (exec form, no shell in between), so
# `docker stop`'s SIGTERM reaches it and starts the drain. Build and run: deploy/README.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed as root, from this checkout; the source is not kept in the image.
COPY pyproject.toml README.md /tmp/tcpecho/
COPY src /tmp/tcpecho/src
RUN pip install '/tmp/tcpecho[fast,metrics]' && rm -rf /tmp/tcpecho

# Run as a user of its own, with no home and no shell: it needs neither.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tcpecho
USER 10001:10001

# The echo port, and the metrics port (/metrics, /healthz, /readyz).
EXPOSE 65432 9100

# /healthz on the metrics port; the slim image has no curl, so Python's urllib asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]

# SIGTERM (docker stop's default, said here so that nobody changes it unawares) drains for
# --drain-timeout, 5 s, within docker stop's 10 s before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tcpecho", "serve"]
CMD ["--host", "0.0.0.0", "--port", "65432", "--metrics", "0.0.0.0:9100", "--log-format", "json", "--quiet"]
