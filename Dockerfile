# replicator in a container: one node per container, its state in a volume.
#
#   docker build -t replicator .                          # with a registry: python:3.11-slim
#   docker build --build-arg BASE=my/python:3.11 -t replicator .
#
# Offline: put the project's wheel and its dependencies' wheels in ./wheels
# (`pip wheel --wheel-dir wheels .`, as scripts/cluster-test does) and the build needs no
# network; without ./wheels the builder stage fetches them from the package index.
# Works with the classic builder (docker-compose 1.29) and BuildKit.
ARG BASE=python:3.11-slim

FROM ${BASE} AS builder
COPY . /src
RUN python3 -m venv /opt/replicator \
    && if ls /src/wheels/*.whl >/dev/null 2>&1; then \
           /opt/replicator/bin/pip install --no-cache-dir --no-index \
               --find-links /src/wheels replicator; \
       else \
           /opt/replicator/bin/pip install --no-cache-dir /src; \
       fi \
    && /opt/replicator/bin/replicator --version

FROM ${BASE}
# A fixed uid, so a key file on the host can be given to it (chown 10001 psk).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/replicator \
        --shell /usr/sbin/nologin replicator \
    && mkdir -p /var/lib/replicator /var/backups/replicator /run/replicator /etc/replicator \
    && chown replicator:replicator /var/lib/replicator /var/backups/replicator /run/replicator \
    && chmod 0750 /var/lib/replicator /var/backups/replicator /run/replicator
COPY --from=builder /opt/replicator /opt/replicator
ENV PATH=/opt/replicator/bin:$PATH \
    PYTHONUNBUFFERED=1
USER replicator
WORKDIR /var/lib/replicator
VOLUME ["/var/lib/replicator", "/var/backups/replicator"]
EXPOSE 9001
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["replicator", "status", "--socket", "/run/replicator/control.sock"]
ENTRYPOINT ["replicator"]
CMD ["run", "-c", "/etc/replicator/node.hcl", "--log-format", "json"]
