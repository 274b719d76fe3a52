# kvbroker: the broker daemon in a runtime image (README, "Deploy").
#
#   docker build -t kvbroker .                       # host device (POSIX shared memory)
#   docker build -t kvbroker:cuda \
#     --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime .   # GPUs
#
# Stages on the same base: "build" makes a virtual environment in /opt/kvbroker, the
# runtime stage copies only that environment (no pip cache, no sources, no compiler).
# The environment sees the base's site-packages, so a CUDA PyTorch base image lends its
# torch and nothing multi-GB is downloaded again; a plain python base gets the CPU torch.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The dependency list alone, so that the layer installing it stays cached until the
# list itself changes (not at every edit of pyproject.toml).
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' > /requirements.txt

FROM ${BASE_IMAGE} AS build
# TORCH_VERSION: installed unless the base has torch. EXTRA_FIND_LINKS: a directory of
# wheels mounted into the build (offline torch); else TORCH_INDEX_URL (the CPU builds).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRA_FIND_LINKS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv --system-site-packages /opt/kvbroker
RUN if /opt/kvbroker/bin/python -c 'import torch' 2>/dev/null; then \
      echo "torch from the base image"; \
    elif [ -n "$EXTRA_FIND_LINKS" ]; then \
      /opt/kvbroker/bin/pip install --find-links "$EXTRA_FIND_LINKS" "torch==${TORCH_VERSION}"; \
    else \
      /opt/kvbroker/bin/pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi
# The dependencies in their own layer: a change to the sources reinstalls kvbroker alone.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN /opt/kvbroker/bin/pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY kvbroker ./kvbroker
COPY client ./client
# pip leaves the bytecode it compiled: the image is larger by it, and every start skips
# compiling torch's and grpc's modules again (PYTHONDONTWRITEBYTECODE keeps them as built).
RUN /opt/kvbroker/bin/pip install --no-deps --no-build-isolation .

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kvbroker" \
      org.opencontainers.image.description="A node-local daemon that owns accelerator memory for KV caches and hands it to model workers zero-copy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md#deploy"
# A fixed uid: workers in other containers run as this uid too, because host segments
# are created mode 0600 (only the broker's uid maps them) and the Unix socket 0660.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kvbroker \
 && install -d -o kvbroker -g kvbroker -m 0770 /run/kvbroker
COPY --from=build /opt/kvbroker /opt/kvbroker
COPY deploy/container/kvbroker.toml /etc/kvbroker/kvbroker.toml
COPY deploy/container/example_worker.py /usr/local/share/kvbroker/example_worker.py
ENV PATH=/opt/kvbroker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVBROKER_TARGET=unix:///run/kvbroker/kvbroker.sock
USER 10001:10001
# The Unix socket (and its peer handshake socket) for workers on this node.
VOLUME ["/run/kvbroker"]
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
# gRPC health of kvbroker.v1.CacheBroker (exit 0 only when SERVING), over the socket.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["kvbroker", "--timeout", "3", "ping", "--count", "1"]
ENTRYPOINT ["kvbroker"]
CMD ["serve", "--config", "/etc/kvbroker/kvbroker.toml"]
