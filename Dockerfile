# syntax=docker/dockerfile:1
# Twofold serving image: one image, three entrypoints (`twofold serve-assignment`,
# `twofold serve-model`, `twofold serve-analysis`); why one image: k8s/README.md#images.
#
#   docker build -t twofold:0.1.0 .                       # serving image (default target)
#   docker build --target train -t twofold-train:0.1.0 .  # training/export jobs (adds XGBoost)
#
# The serving image installs only the core dependencies: XGBoost and the ONNX converters are
# the `train` extra and stay out of it (the model server runs exported ONNX graphs).
# Every stage starts from the same base so the virtualenv copied between them keeps working;
# pin it by digest (python:3.11-slim-bookworm@sha256:...) in your release build.

# ---- build: resolve and install into a self-contained virtualenv -----------------------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/twofold
WORKDIR /src
# Only what the distribution needs (see .dockerignore); tests, benches and k8s stay out.
COPY pyproject.toml README.md ./
COPY twofold ./twofold
COPY protos ./protos
COPY assignment_server ./assignment_server
COPY model_server ./model_server
COPY analysis_worker ./analysis_worker
COPY client_sdk ./client_sdk
RUN /opt/twofold/bin/pip install --no-compile . \
 && /opt/twofold/bin/python -m compileall -q /opt/twofold/lib \
 && /opt/twofold/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('xgboost', 'onnxmltools') if u.find_spec(m)]; sys.exit(f'serving image must not contain {bad}' if bad else 0)"

# ---- train: the serving environment plus the training extra, for export jobs ---------------
FROM build AS train-build
RUN /opt/twofold/bin/pip install --no-compile ".[train]"

FROM python:3.11-slim-bookworm AS train
RUN groupadd --system --gid 10001 twofold \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin twofold
COPY --from=train-build /opt/twofold /opt/twofold
ENV PATH=/opt/twofold/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["twofold"]
CMD ["train", "--help"]

# ---- serve: the default target --------------------------------------------------------------
FROM python:3.11-slim-bookworm AS serve
LABEL org.opencontainers.image.title="twofold" \
      org.opencontainers.image.description="Twofold servers: assignment, model, analysis" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 twofold \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin twofold
COPY --from=build /opt/twofold /opt/twofold
# HOME=/tmp: the root filesystem is read-only in Kubernetes; /tmp is the emptyDir for scratch
# (DuckDB spill files, temporary Parquet before rename).
ENV PATH=/opt/twofold/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TWOFOLD_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
# gRPC 5005x, Prometheus 5105x (assignment, model, analysis); the analysis results web UI 52053.
EXPOSE 50051 50052 50053 51051 51052 51053 52053
ENTRYPOINT ["twofold"]
CMD ["--help"]
