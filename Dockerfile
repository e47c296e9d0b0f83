# syntax=docker/dockerfile:1
# Two images from one base:
#   docker build --target serve -t ptmrec-serve .     # torch-free gRPC server (default target)
#   docker build --target train -t ptmrec-train .     # training + export (+ serving deps)
# Run the server with bundles mounted read-only and the event store on a named volume. The image
# binds 0.0.0.0, so it refuses to start without authentication: mount a key file (ROLE:KEY lines,
# re-read on change) or pass keys in the environment, or say --insecure-allow-anonymous:
#   docker run --rm -p 50051:50051 -p 9100:9100 -v "$PWD/bundles:/bundles:ro" -v ptmrec-state:/state \
#       -v "$PWD/keys.txt:/run/secrets/ptmrec-keys:ro" ptmrec-serve --api-keys /run/secrets/ptmrec-keys
#   docker run ... -e PTMREC_API_KEYS="read:$READ_KEY,write:$WRITE_KEY" ptmrec-serve
# A CPU-only train image: --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
WORKDIR /src

# gRPC stubs, generated at build time by the grpcio-tools version pinned in pyproject.toml
# (gencode must match the protobuf runtime, so stubs are never copied from the build host).
FROM base AS stubs
COPY pyproject.toml ./
RUN pip install "$(python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["serve"]; print(next(d for d in deps if d.startswith("grpcio-tools")))')"
COPY protos/ protos/
RUN python -m protos.build

# Serving virtualenv: the core dependencies plus the `serve` group only; no torch.
FROM base AS serve-build
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY index/ index/
COPY serve/ serve/
COPY --from=stubs /src/serve/_gen/ serve/_gen/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install ".[serve]" \
 && /opt/venv/bin/python -c "import serve.server, sys; assert 'torch' not in sys.modules"

FROM base AS serve
COPY --from=serve-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN mkdir /state && chown app /state
USER app
WORKDIR /home/app
VOLUME ["/bundles", "/state"]
EXPOSE 50051 9100
# Exit status 0 only when grpc.health.v1 reports SERVING (a bundle is loaded and smoke-tested).
# Health is public by default; with --no-public-health set PTMREC_API_KEY for this check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "serve.client", "--target", "127.0.0.1:50051", "--timeout", "3", "health"]
# Inside a container the server must listen on all interfaces for -p to reach it.
ENTRYPOINT ["python", "-m", "serve", "--bundles", "/bundles", "--state", "/state", \
            "--host", "0.0.0.0", "--port", "50051", "--metrics-host", "0.0.0.0", \
            "--metrics-port", "9100"]
CMD []

# Training and export: everything, with the same stubs so exported bundles can be smoke-served.
FROM base AS train
ARG PIP_EXTRA_INDEX_URL=
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY index/ index/
COPY serve/ serve/
COPY train/ train/
COPY export/ export/
COPY configs/ configs/
COPY --from=stubs /src/serve/_gen/ serve/_gen/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[train,serve]"
ENV PATH=/opt/venv/bin:$PATH
USER app
WORKDIR /home/app
VOLUME ["/data", "/runs", "/bundles"]
ENTRYPOINT ["python", "-m", "train"]

# The default target is the serving image.
FROM serve
