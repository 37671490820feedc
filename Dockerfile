# syntax=docker/dockerfile:1
# Build: a virtualenv with Nexus and its dependencies (embedded PostgreSQL included).
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/nexus
COPY pyproject.toml README.md ./
COPY service service
COPY db db
RUN /opt/nexus/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/nexus/bin/pip install --no-cache-dir .

# Run: the virtualenv only, as an unprivileged user.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 nexus \
 && mkdir -p /var/lib/nexus && chown nexus:nexus /var/lib/nexus
COPY --from=build /opt/nexus /opt/nexus
ENV PATH=/opt/nexus/bin:$PATH \
    NEXUS_HOST=0.0.0.0 \
    NEXUS_PORT=50051 \
    NEXUS_DATA_DIR=/var/lib/nexus
USER nexus
VOLUME /var/lib/nexus
EXPOSE 50051
# `nexus health` talks to 127.0.0.1 when the server listens on 0.0.0.0.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["nexus", "health"]
# Set NEXUS_DATABASE_URL (and NEXUS_JWT_SECRET) to use an external PostgreSQL
# instead of the embedded one kept in /var/lib/nexus.
CMD ["nexus", "serve"]
