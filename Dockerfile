# eagercache with the example fetchers as demo content, on the embedded memory:// store by default.
#   docker build -t eagercache .
#   docker run --rm -p 8000:8000 eagercache
#   docker run --rm -p 8000:8000 -e EAGERCACHE_REDIS_URL=redis://redis:6379/0 eagercache
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The project and the examples package (its entry points register clock, greeting and prices).
# The server stack is uvloop + httptools: the project's dependencies pull their wheels on CPython/Linux and
# `eagercache serve` picks them (its "server stack" start-up log line shows loop=uvloop http=httptools).
# Importing them here fails the build rather than letting the image fall back to asyncio + h11 unnoticed.
COPY pyproject.toml README.md /tmp/eagercache/
COPY src /tmp/eagercache/src
COPY examples /tmp/eagercache/examples
RUN pip install --no-cache-dir /tmp/eagercache /tmp/eagercache/examples \
    && python -c "import uvloop, httptools" \
    && rm -rf /tmp/eagercache

# A numeric USER: Kubernetes' runAsNonRoot can only verify a numeric UID, not a user name.
RUN groupadd --system --gid 10001 eagercache \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin eagercache
USER 10001:10001

EXPOSE 8000
# The probe follows EAGERCACHE_PORT; if you change the port, change it there rather than with --port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EAGERCACHE_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["eagercache"]
CMD ["serve", "--host", "0.0.0.0"]
