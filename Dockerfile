# syntax=docker/dockerfile:1
#
# mailwarden container images: one file, two targets (see images/README.md).
#
#   docker build --target proxy    -t mailwarden-proxy:0.1.0    .
#   docker build --target operator -t mailwarden-operator:0.1.0 .
#
# Always name the target: without --target the last stage (operator) is built.
#
# Both install the wheel built from this tree, and nothing else of it: no source tree in
# the image, no compilers (every dependency must come as a binary wheel), uid/gid 65532.
# The proxy image installs `mailwarden` without extras, so no kopf/aiohttp (the operator
# extra) and no Kubernetes client: tests/integration/test_images.py import-checks that.

# Pinned by tag. For reproducible builds pin by digest as well, e.g.
#   --build-arg PYTHON_IMAGE=python:3.12-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.12-slim-bookworm` prints the digest).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- builder: the wheel, nothing else ------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: what both images share -------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ONLY_BINARY=:all:
# A system user without a home: nothing is written at run time (readOnlyRootFilesystem).
RUN groupadd --system --gid 65532 mailwarden \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mailwarden
WORKDIR /
# --build-arg VERSION=… REVISION=$(git rev-parse HEAD) when releasing.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# --- proxy: the data plane (sidecar) -------------------------------------------------
FROM runtime AS proxy
LABEL org.opencontainers.image.title="mailwarden-proxy" \
      org.opencontainers.image.description="Plain SMTP/IMAP/POP3 in, OAuth 2.0 (XOAUTH2/OAUTHBEARER) out"
COPY --from=builder /wheels/ /tmp/wheels/
RUN python -m pip install /tmp/wheels/mailwarden-*.whl \
 && rm -rf /tmp/wheels
USER 65532:65532
# Documentation only: the listeners bind 127.0.0.1 at the MailAccount's local ports
# (defaults below); 9464 serves /metrics, /healthz and /readyz.
EXPOSE 1025 1110 1143 9464
# The operator's sidecar runs `mailwarden-proxy --config /etc/mailwarden/<ma>/proxy.yaml`.
ENTRYPOINT ["mailwarden-proxy"]
CMD ["--help"]

# --- operator: kopf + the consent server + the injection webhook ---------------------
FROM runtime AS operator
LABEL org.opencontainers.image.title="mailwarden-operator" \
      org.opencontainers.image.description="Kubernetes operator for MailAccounts and the mailwarden-proxy sidecar"
COPY --from=builder /wheels/ /tmp/wheels/
RUN wheel="$(echo /tmp/wheels/mailwarden-*.whl)" \
 && python -m pip install "${wheel}[operator]" \
 && rm -rf /tmp/wheels
USER 65532:65532
# Documentation only: 8080 consent/callback server, 8081 /metrics /healthz /readyz,
# 9443 the admission webhook (MAILWARDEN_*_PORT settings).
EXPOSE 8080 8081 9443
# The chart passes the namespaces as arguments (`-n NS`… or `-A`) and the same list in
# MAILWARDEN_NAMESPACES, which the handlers read; the two must agree.
ENTRYPOINT ["kopf", "run", "--standalone", "-m", "mailwarden_operator.main"]
CMD ["--all-namespaces"]
