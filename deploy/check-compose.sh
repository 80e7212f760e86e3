#!/usr/bin/env bash
# Static checks of the deployment files (there is no Docker engine on the CI machine):
#  1. docker-compose.yml validates (Debian's docker-compose 1.29 `config -q`, installed here if missing), with the
#     .env an operator makes from .env.example (`env_file: .env` is required: 1.29 cannot make it optional);
#  1b. every setting the services read reaches their containers: set in `environment:` or named in .env.example
#     (deploy/check_compose_env.py), and every name in .env.example is one a service reads;
#  2. each service Dockerfile copies only the root manifests, libs/common and its own package, and installs only
#     its own package — proved by doing its two `uv sync` steps in a scratch dir and importing the package there
#     while a sibling service's package stays absent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null 2>&1; then
  (apt-get install -y -q docker-compose >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1)) || true
fi
if command -v docker-compose >/dev/null 2>&1; then
  # In a scratch copy: the operator's own .env (if any) is neither read nor touched.
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  cp docker-compose.yml "$scratch/docker-compose.yml"
  cp .env.example "$scratch/.env"
  docker-compose -f "$scratch/docker-compose.yml" --project-directory "$scratch" config -q
  docker-compose -f "$scratch/docker-compose.yml" --project-directory "$scratch" --profile sim config --services \
    | sort | tr '\n' ' ' | grep -q "sim-vast" || { echo "compose: sim profile lost its services" >&2; exit 1; }
  echo "compose: docker-compose.yml valid (default and sim profile, .env from .env.example)"
else
  echo "compose: docker-compose unavailable; YAML-only check" >&2
  .venv/bin/python -c "import yaml,sys; d=yaml.safe_load(open('docker-compose.yml')); assert {'rabbitmq','redis','scheduler','provisioner','proxy','callback-relay'} <= set(d['services'])"
fi
grep -qE "^ +container_name:" <(sed -n '/^  provisioner:/,/^  [a-z-]*:$/p' docker-compose.yml) && { echo "provisioner must not set container_name" >&2; exit 1; }
.venv/bin/python deploy/check_compose_env.py
.venv/bin/python deploy/check_dockerfiles.py
