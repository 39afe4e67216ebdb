# make demo   emulated ECR + the proxy on localhost, with commands to try
# make test   everything: installs Debian packages and .venv, runs unit and integration tests
#             (integration twice: one process, then --workers 2)
# make unit   only the fast unit tests
# make lint   ruff and mypy (also run by make test)
# make bench  ecr-twisted against nginx and direct registry access (bench/README.md; ~13 min,
#             BENCH_ARGS=--quick for ~4 min, BENCH_ARGS="--quick --source" for the working tree); not part of make test
SHELL := /bin/bash
DEBIAN_TEST := docker-registry skopeo podman curl ca-certificates docker.io containerd buildah prometheus systemd nginx-light tinyproxy
# prometheus: promtool checks and unit-tests deploy/prometheus/alerts.yaml; systemd: systemd-analyze checks
# deploy/systemd/ecr-twisted.service (both in tests/unit/test_deploy.py); tinyproxy: the egress proxy
# every upstream leg goes through in tests/integration/test_egress.py
DEBIAN_BENCH := nginx-light wrk curl docker-registry
BENCH_ARGS ?=

.PHONY: deps demo test unit lint bench clean

deps:
	@bash scripts/debian-deps.sh $(DEBIAN_TEST)
	@bash scripts/venv.sh

demo: deps
	@bash scripts/demo.sh

test: deps lint
	.venv/bin/python -m pytest -q tests
	@echo "== integration tests again, every proxy with --workers 2 =="
	ECRTEST_WORKERS=2 .venv/bin/python -m pytest -q tests/integration

unit: deps
	.venv/bin/python -m pytest -q tests/unit

# the linter and the type checker, settings in pyproject.toml (part of make test)
lint: deps
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:
	@bash scripts/debian-deps.sh $(DEBIAN_BENCH)
	@bash scripts/venv.sh
	@.venv/bin/python -c 'import matplotlib' 2>/dev/null || \
	  .venv/bin/pip install -q --disable-pip-version-check 'matplotlib>=3.6' 2> >(grep -v "^WARNING: Location '" >&2)
	.venv/bin/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf .venv .work build *.egg-info
