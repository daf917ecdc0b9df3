# One image for every subcommand: `loractl sidecar`, `loractl controller`, `loractl sim`, ...
#
#   docker build -t ghcr.io/loractl/loractl:0.1.0 .
#
# The build stage installs loractl and its dependencies into a virtual environment, with
# the picker's decision path compiled (LORACTL_COMPILE=1, see setup.py); the final stage is
# the same slim Python base with only that environment copied in: no compiler, no pip
# cache, no source tree. Both stages must use the same base, because the environment's
# interpreter is a link to the base's.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LORACTL_COMPILE=1
# A C compiler for the compiled decision path; the Python headers come with the base.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/loractl
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY loractl ./loractl
COPY sidecar ./sidecar
COPY controller ./controller
COPY simulator ./simulator
# Not editable: the package is copied into the environment, so /src can be left behind.
RUN /opt/loractl/bin/pip install . \
    && /opt/loractl/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="loractl" \
      org.opencontainers.image.description="LoRA adapter lifecycle for vLLM on Kubernetes: sidecar, canary controller, LoRA-aware endpoint picker and a vLLM simulator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/loractl/loractl"
COPY --from=build /opt/loractl /opt/loractl
ENV PATH=/opt/loractl/bin:$PATH \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes can verify runAsNonRoot; no home directory is needed (the
# manifests give the sidecar scratch space for the Hugging Face cache).
USER 65532:65532
ENTRYPOINT ["/opt/loractl/bin/loractl"]
