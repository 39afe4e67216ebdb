# make demo   emulated ECR + the proxy on localhost, with commands to try
# make test   everything: installs Debian packages and .venv, runs unit and integration tests
# make unit   only the fast unit tests
SHELL := /bin/bash
DEBIAN_TEST := docker-registry skopeo podman curl ca-certificates

.PHONY: deps demo test unit clean

deps:
	@bash scripts/debian-deps.sh $(DEBIAN_TEST)
	@bash scripts/venv.sh

demo: deps
	@bash scripts/demo.sh

test: deps
	.venv/bin/python -m pytest -q tests

unit: deps
	.venv/bin/python -m pytest -q tests/unit

clean:
	rm -rf .venv .work build *.egg-info
