# Lakelet on Debian, PostgreSQL from the distribution. Runs as the unprivileged user `lakelet`,
# so computes run as that user too; the data dir is a volume.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql postgresql-contrib \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 lakelet \
 && mkdir -p /data && chown lakelet:lakelet /data

WORKDIR /opt/lakelet
COPY pyproject.toml README.md ./
COPY configs ./configs
COPY lakelet ./lakelet
COPY proxy ./proxy
COPY compute ./compute
COPY storage ./storage
COPY lakehouse ./lakehouse
COPY dataapi ./dataapi
RUN pip install --no-cache-dir .
# The pooler's hot modules (mypyc) and the session relay (C) are compiled here, then the compiler
# goes: without these builds Lakelet runs the same code in Python, slower.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && (python -c 'from proxy.native import build; build()' \
     && python -c 'from proxy.relay import build; build()' \
     || echo "native builds failed: Lakelet runs interpreted") \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

USER lakelet
ENV LAKELET_DATA_DIR=/data \
    LAKELET_LISTEN=0.0.0.0:55432 \
    LAKELET_HTTP=0.0.0.0:55480 \
    LAKELET_DATA_API=0.0.0.0:55433 \
    LAKELET_CONFIG=/opt/lakelet/configs/lakelet.toml
VOLUME ["/data"]
EXPOSE 55432 55480 55433
STOPSIGNAL SIGTERM
CMD ["lakelet", "up"]
