# fedreid: one image for every role of the multi-site demo (certificates, SuperLink, site SuperNodes,
# submitter). Built locally by `docker compose up`; nothing is pulled at run time.
#
# BASE_IMAGE: any Debian-like image with Python 3.11+ and pip. Without registry access,
# deploy/docker-setup.sh builds one from Debian's packages (fedreid/bookworm-python:3.11) and
# docker-compose.yml passes it in from .env.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    FLWR_HOME=/flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: torch/torchvision/flwr as pinned in pyproject.toml.
# The pip settings (index, CA bundle) are build secrets: mounted for these steps only, in no layer.
COPY pyproject.toml README.md ./
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    export PIP_CONFIG_FILE=/run/secrets/pip_conf \
    && mkdir -p reid strategies clients server conf \
    && for p in reid strategies clients server conf; do touch "$p/__init__.py"; done \
    && python -m pip install . \
    && python -m pip uninstall -y fedreid

# The project itself (also the Flower app that `flwr run /app` packages).
COPY . .
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    PIP_CONFIG_FILE=/run/secrets/pip_conf python -m pip install --no-deps -e . \
    && mkdir -p /flwr /outputs /state /data /certs \
    && chmod 777 /flwr /outputs /state /data

CMD ["fedreid-sim", "--help"]
