# dicom-node: install, test, serve.
# `make install` creates .venv, installs the project with its test extras and the
# Debian packages the tests use (DCMTK, dicom3tools, pixelmed, Orthanc).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dcmtk dicom3tools pixelmed-apps orthanc systemd
CONFIG ?= config.toml

.PHONY: install system-packages test lint serve demo demo-model clean

install: system-packages $(VENV)/.installed

system-packages:
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null \
	    || ! command -v DicomSRValidator >/dev/null || ! command -v Orthanc >/dev/null \
	    || ! command -v systemd-analyze >/dev/null; then \
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

# The main job on one phantom patient: node started, T1C sent with storescu, SC/SEG/SR
# received back, TBR table and PNG previews (demo-output/).
demo: install
	$(VENV)/bin/dicom-node-train demo --config $(CONFIG) --out demo-output

# Reproduce the shipped demo model (about 3 h on 2 CPU cores: phantoms and dataset
# 30 min, training 80 min, fine-tuning with a weight average 20 min, evaluation 8 min);
# see docs/model-card.md.
DEMO_DATA ?= build/demo-data
demo-model: install
	$(VENV)/bin/dicom-node-train phantom --patients 400 --seed 0 --slice-spacing-mm 3 --workers 2 \
	  --out $(DEMO_DATA)/studies
	$(VENV)/bin/dicom-node-train dataset --studies $(DEMO_DATA)/studies --out $(DEMO_DATA)/ds128-400 \
	  --size 128 --seed 0 --workers 2
	$(VENV)/bin/dicom-node-train train --dataset $(DEMO_DATA)/ds128-400 --out $(DEMO_DATA)/run400 \
	  --target uptake --ngf 16 --ndf 32 --batch-size 8 --epochs 3 --decay-epochs 3 \
	  --tumour-oversample 6 --tumour-l1-weight 30 --lambda-l1 1000 --hflip --seed 0 --threads 2 \
	  --checkpoint-every 500 --val-max-slices 512 --name fdopa-demo --version 2.0
	$(VENV)/bin/dicom-node-train train --dataset $(DEMO_DATA)/ds128-400 --out $(DEMO_DATA)/run400-ema \
	  --init-generator $(DEMO_DATA)/run400/generator.pt --ema-decay 0.999 --lr 1e-4 \
	  --target uptake --ngf 16 --ndf 32 --batch-size 8 --epochs 1 --decay-epochs 1 \
	  --tumour-oversample 6 --tumour-l1-weight 30 --lambda-l1 1000 --hflip --seed 1 --threads 2 \
	  --checkpoint-every 500 --val-max-slices 512 --name fdopa-demo --version 2.0
	# Smoothing along the slice normal, chosen on the validation patients (docs/model-card.md:
	# the highest slice TBR r whose PSNR is not below the unsmoothed output's): 2.4 mm.
	for mm in 0 1.2 1.8 2.4 3.0 3.6; do \
	  $(VENV)/bin/dicom-node-train evaluate --dataset $(DEMO_DATA)/ds128-400 \
	    --weights $(DEMO_DATA)/run400-ema/generator.pt --split val --slice-smoothing-mm $$mm \
	    --out $(DEMO_DATA)/val400-s$$mm || exit 1; \
	done
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run400-ema/checkpoint.pt \
	  --out $(DEMO_DATA)/run400-ema/generator-s2.4.pt --name fdopa-demo --version 2.1 \
	  --slice-smoothing-mm 2.4
	$(VENV)/bin/dicom-node-train evaluate --dataset $(DEMO_DATA)/ds128-400 \
	  --weights $(DEMO_DATA)/run400-ema/generator-s2.4.pt --split test --out $(DEMO_DATA)/report400-s2.4
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run400-ema/checkpoint.pt \
	  --out dicom_node/models/demo-generator.pt --name fdopa-demo --version 2.1.1 \
	  --slice-smoothing-mm 2.4 --metrics $(DEMO_DATA)/report400-s2.4/summary.json

clean:
	rm -rf var build *.egg-info
