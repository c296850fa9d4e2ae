# fedreid: one image for every role of the multi-site demo (certificates, SuperLink, site SuperNodes,
# submitter). Built locally by `docker compose up`; nothing is pulled at run time except this base.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_HOME=/flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: torch/torchvision/flwr as pinned in pyproject.toml.
COPY pyproject.toml README.md ./
RUN mkdir -p reid strategies clients server conf \
    && for p in reid strategies clients server conf; do touch "$p/__init__.py"; done \
    && pip install . \
    && pip uninstall -y fedreid

# The project itself (also the Flower app that `flwr run /app` packages).
COPY . .
RUN pip install --no-deps -e . \
    && mkdir -p /flwr /outputs /state /data /certs \
    && chmod 777 /flwr /outputs /state /data

CMD ["fedreid-sim", "--help"]
