# syntax=docker/dockerfile:1
#
# lstm-serve image: the gRPC server (ENTRYPOINT lstm-serve) with the default checkpoint
# baked in; the same image runs lstm-train (docker-compose.yml, service `train`).
#
#   docker build -t lstm-serve .                                        # CPU torch (default)
#   docker build -t lstm-serve:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA torch wheel
#
# TORCH_VARIANT names a wheel index of the PyTorch download site (cpu, cu126, cu128, ...;
# pick one that has torch==TORCH_VERSION for your driver), or set TORCH_INDEX_URL directly.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index; the project's pin (torch==2.13.0) then accepts the
# local variant (2.13.0+cpu, 2.13.0+cu128) and nothing else is downloaded for it.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY clients/python clients/python
COPY model model
COPY service service
COPY bench bench
RUN pip install --no-cache-dir ./clients/python . \
    && python -c "import torch, grpc, grpc_health.v1, service, model; print('torch', torch.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LSTM_SERVE_CHECKPOINT=/opt/lstm-serve/checkpoints/default \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_METRICS_PORT=9400 \
    LSTM_SERVE_LOG_FORMAT=json \
    LSTM_SERVE_STATE_DIR=/var/lib/lstm-serve/state
RUN groupadd --system --gid 10001 lstm \
    && useradd --system --uid 10001 --gid lstm --home-dir /var/lib/lstm-serve --shell /usr/sbin/nologin lstm \
    && mkdir -p /var/lib/lstm-serve/state /var/lib/lstm-serve/checkpoints \
    && chown -R lstm:lstm /var/lib/lstm-serve
COPY --from=build /opt/venv /opt/venv
COPY checkpoints/default /opt/lstm-serve/checkpoints/default
COPY data/tinyshakespeare.txt /opt/lstm-serve/data/tinyshakespeare.txt
COPY scripts/healthcheck.py scripts/train_if_missing.sh /opt/lstm-serve/scripts/
WORKDIR /var/lib/lstm-serve
# lstm (10001): named volumes mounted on state/ and checkpoints/ start as copies of these
# empty, lstm-owned directories, so the server and lstm-train can write to them.
USER 10001:10001
EXPOSE 50051 9400
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/lstm-serve/scripts/healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-serve"]
