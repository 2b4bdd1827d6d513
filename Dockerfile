# One image for every refstream process (edge, worker, migrate, the CLI), built once and
# reused by every service of compose.yaml.
#
# amd64 and arm64 alike: python:3.11-slim is a multi-arch image (linux/amd64, linux/arm64
# among others) and every compiled runtime dependency ships manylinux wheels for x86_64 and
# aarch64, so nothing below names an architecture:
#   docker buildx build --platform linux/amd64,linux/arm64 -t refstream:local .
#
# No extras: the image runs against real Redis and Postgres. The embedded servers
# (refstream[embedded]) are for `refstream dev` and the tests only, and have no aarch64 wheels.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE schema.sql ./
COPY ingest ingest
COPY workers workers
COPY refstream refstream
RUN pip install --no-cache-dir . && useradd --system --no-create-home refstream \
    && mkdir -p /var/lib/refstream/spool /var/lib/refstream/archive && chown -R refstream /var/lib/refstream
USER refstream
# accepted events wait here while Redis is unreachable: mount a volume on it
ENV REFSTREAM_SPOOL_DIR=/var/lib/refstream/spool
# the edge; a worker's /metrics (REFSTREAM_METRICS_PORT)
EXPOSE 8000 9464
ENTRYPOINT ["refstream"]
CMD ["--help"]
