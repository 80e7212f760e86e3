# gonka-hybrid — two commands for a newcomer: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip on this machine warns about file:// indexes that do not exist; keep real errors only.
QUIET_PIP := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
PY ?= python3.11
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
VENV := .venv
TOOLS := .tools
export UV_PYTHON := $(PY)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_LINK_MODE := copy
export SSL_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt
export UV_SYSTEM_CERTS := 1

.PHONY: run test venv lint typecheck pytest services-up compose-check catalogue tools clean

$(UV):
	$(PY) -m venv $(UV_HOME)
	$(UV_HOME)/bin/pip install -q uv==0.13.8 $(QUIET_PIP)
	test -x $(UV)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml $(wildcard */pyproject.toml */*/pyproject.toml)
	$(UV) sync --all-packages --frozen --quiet
	touch $@

venv: $(VENV)/.synced

# The official vastai CLI (fidelity tests) lives in its own venv: its pins are not ours.
$(TOOLS)/vastai/bin/vastai:
	$(PY) -m venv $(TOOLS)/vastai
	$(TOOLS)/vastai/bin/pip install -q vastai==1.9.1 $(QUIET_PIP)
	test -x $@

tools: $(TOOLS)/vastai/bin/vastai

services-up:
	@bash deploy/local/ensure-infra.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy libs/common/src services/scheduler/src services/provisioner/src services/proxy/src services/callback-relay/src sim/src cli/src

compose-check:
	@bash deploy/check-compose.sh

catalogue: venv
	$(VENV)/bin/python -m hybrid_common.catalogue --write docs

# The suite waits on simulated clocks more than it computes: two workers halve the wall time on two cores and leave
# the timing-sensitive runs (fault injection, PoC windows) enough CPU; three were faster but flaky. A file stays on one
# worker (module fixtures such as a whole running world are shared), and conftest.py starts the longest files first.
PYTEST_WORKERS ?= 2
pytest: venv tools services-up
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test: venv tools services-up lint typecheck compose-check pytest

run: venv services-up
	$(VENV)/bin/python -m hybridctl.run

clean:
	rm -rf $(VENV) $(UV_HOME) $(TOOLS)
