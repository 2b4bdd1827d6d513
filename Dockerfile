FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md schema.sql ./
COPY ingest ingest
COPY workers workers
COPY refstream refstream
RUN pip install --no-cache-dir . && useradd --system refstream \
    && mkdir -p /var/lib/refstream/spool && chown -R refstream /var/lib/refstream
USER refstream
ENTRYPOINT ["refstream"]
