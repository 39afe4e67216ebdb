# ecr-twisted: docker run -e ECRPROXY_ANONYMOUS=true -e ECRPROXY_REGION=eu-west-1 -p 5000:5000 IMAGE
# Configure with ECRPROXY_* variables (see README); AWS credentials come from botocore's chain
# (environment, web identity / IRSA, container or instance metadata).
FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY ecr_twisted ./ecr_twisted
COPY twisted ./twisted
RUN python -m venv /opt/ecrproxy \
 && /opt/ecrproxy/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && /opt/ecrproxy/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
 && /opt/ecrproxy/bin/twistd --help | grep -q ecrproxy

FROM python:3.12-slim-bookworm
COPY --from=build /opt/ecrproxy /opt/ecrproxy
# the probe for HEALTHCHECK, Kubernetes exec probes and systemd (mode 0755 in git): reads
# ECRPROXY_METRICS_PORT when it runs
COPY deploy/docker/ecrproxy-healthcheck /opt/ecrproxy/bin/ecrproxy-healthcheck
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ecrproxy
USER 10001:10001
ENV PATH=/opt/ecrproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ECRPROXY_PORT=5000 \
    ECRPROXY_METRICS_PORT=9100
EXPOSE 5000 9100
# Follows ECRPROXY_METRICS_PORT as set at run time (docker run -e ECRPROXY_METRICS_PORT=9200 ...).
# HEALTHCHECK is a Docker-format instruction: OCI-format images drop it, so build with
# `podman build --format docker` / `buildah bud --format docker` to keep it; Kubernetes ignores it and
# uses the Deployment's probes (deploy/kubernetes/).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s CMD ["ecrproxy-healthcheck", "/healthz"]
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "ecrproxy"]
