# dicom-node: install, test, serve.
# `make install` creates .venv, installs the project with its test extras and the
# Debian packages the tests use (DCMTK, dicom3tools, pixelmed, Orthanc).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dcmtk dicom3tools pixelmed-apps orthanc
CONFIG ?= config.toml

.PHONY: install system-packages test lint serve clean

install: system-packages $(VENV)/.installed

system-packages:
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null \
	    || ! command -v DicomSRValidator >/dev/null || ! command -v Orthanc >/dev/null; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	set -o pipefail; $(PIP) install -q -e '.[test]' 2>&1 | sed '/^WARNING: Location/d'
	$(PY) -c "import dicom_node, torch, pynetdicom, highdicom"
	touch $@

lint: install
	$(VENV)/bin/ruff check dicom_node storage training tests benchmarks
	$(VENV)/bin/mypy dicom_node storage training

test: lint
	$(VENV)/bin/pytest -q

serve: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

clean:
	rm -rf var build *.egg-info
