# dicom-node: install, test, serve.
# `make install` creates .venv, installs the project with its test extras and the
# Debian packages the tests use (DCMTK, dicom3tools, pixelmed, Orthanc with its DICOMweb
# plugin, Chromium, PostgreSQL for the tests' PostgreSQL leg: a throw-away cluster, see
# tests/postgres.py), and OHIF's prebuilt viewer for the browser test.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dcmtk dicom3tools pixelmed-apps orthanc orthanc-dicomweb chromium systemd postgresql
# OHIF's prebuilt viewer (tests/test_browser_ohif.py): `npm pack` of @ohif/app, unpacked
# under build/ohif. Its dist/ is all the test serves; `npm install` of the package would
# not resolve (3.13.2 depends on an @ohif/i18n release that is not on the registry).
OHIF_VERSION ?= 3.13.2
OHIF_DIST := build/ohif/package/dist
CONFIG ?= config.toml

.PHONY: install system-packages browser-test-deps test lint serve demo demo-model clean

install: system-packages $(VENV)/.installed browser-test-deps

system-packages:
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null \
	    || ! command -v DicomSRValidator >/dev/null || ! command -v Orthanc >/dev/null \
	    || ! command -v systemd-analyze >/dev/null || ! command -v chromium >/dev/null \
	    || ! test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	set -o pipefail; $(PIP) install -q -e '.[test]' 2>&1 | sed '/^WARNING: Location/d'
	$(PY) -c "import dicom_node, torch, pynetdicom, highdicom"
	touch $@

# The browser test's viewer; Chromium and Orthanc's DICOMweb plugin come with
# system-packages, Playwright (driving the system Chromium) with the test extras.
browser-test-deps: $(OHIF_DIST)/index.html

$(OHIF_DIST)/index.html:
	@if ! command -v npm >/dev/null; then \
	  echo "browser-test-deps: no npm (Debian package 'npm'): the browser test will skip"; \
	else \
	  mkdir -p build/ohif && cd build/ohif \
	  && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz \
	  && test -f package/dist/index.html && touch package/dist/index.html; \
	fi

lint: install
	$(VENV)/bin/ruff check dicom_node storage training tests benchmarks
	$(VENV)/bin/mypy dicom_node storage training tests benchmarks

test: lint
	$(VENV)/bin/pytest -q

serve: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

# The main job on one phantom patient: node started, T1C sent with storescu, SC/SEG/SR
# received back, TBR table and PNG previews (demo-output/).
demo: install
	$(VENV)/bin/dicom-node-train demo --config $(CONFIG) --out demo-output

# Reproduce the shipped demo model (fdopa-demo 3.6, by way of 3.0, 3.1, 3.2, 3.3, 3.3.1, 3.4
# and 3.5; about 7 h on 2 CPU cores: 3.0-3.2 about 3.5 h; 3.3's cohort 14 min, fine-tuning 14 min,
# four validation benchmarks 20 min, sealed test 10 min; 3.3.1's three validation benchmarks with
# uncertainty passes 18 min, sealed test 6 min; 3.4's fine-tuning 8 min, three validation
# benchmarks 18 min, sealed test 6 min; 3.5's and 3.6's the same); see docs/model-card.md.
# Cohorts: training seed 100 (tumour-enriched), validation seeds 200, 210, 220 (every choice),
# sealed test seeds 300, 400, 500, 600, 700, 800, 900, 1000 (one per release, each drawn after
# its choices, evaluated once).
DEMO_DATA ?= build/m3
DEMO_SMOOTHING ?= 3.6
DEMO_SMOOTHING_33 ?= 1.2
# $(call DEMO_VAL,X): the three validation summaries of release X, for export
DEMO_VAL = $(foreach seed,200 210 220,--validation-benchmark $(DEMO_DATA)/val$(seed)-$(1)/summary.json)
DEMO_VAL_331 = $(call DEMO_VAL,331)
# 3.4's, 3.5's and 3.6's steps: fine-tune run$(1) from $(DEMO_DATA)/$(2) at tumour quantile $(3)
# with hard negatives of L1 weight $(6), export the candidate, benchmark it on the three
# validation cohorts, export it frozen with its interval form $(7), calibration and sealed seed
# $(5), benchmark that once, export version $(4).
define QUANTILE_RELEASE
	$(VENV)/bin/dicom-node-train train --dataset $(DEMO_DATA)/train-s100-c2 --out $(DEMO_DATA)/run$(1) \
	  --init-generator $(DEMO_DATA)/$(2) --target uptake --ngf 16 --ndf 32 \
	  --batch-size 8 --epochs 1 --decay-epochs 2 --lr 0.0001 --lambda-l1 1000 \
	  --tumour-oversample 2 --tumour-l1-weight 10 --tumour-margin-px 2 --tumour-quantile $(3) \
	  --hard-negative-weight $(6) --hard-negative-ratio 1.4 --hard-negative-smooth-px 5 \
	  --small-lesion-area-px 100 --small-lesion-max-gain 6 --ema-decay 0.999 --hflip --bf16 \
	  --augment-rotation-deg 10 --augment-scale 0.08 --augment-shift-px 6 --threads 2 \
	  --checkpoint-every 500 --val-max-slices 512 --seed 0 --name fdopa-demo --version $(4)
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run$(1)/checkpoint.pt \
	  --out $(DEMO_DATA)/run$(1)/generator-cand.pt --name fdopa-demo --version $(4)-cand \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200,210,220
	for seed in 200 210 220; do \
	  $(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run$(1)/generator-cand.pt \
	    --seed $$seed --patients 60 --cohort validation --out $(DEMO_DATA)/val$$seed-$(1) \
	    --uncertainty-samples 4 || exit 1; \
	done
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run$(1)/checkpoint.pt \
	  --out $(DEMO_DATA)/run$(1)/generator-frozen.pt --name fdopa-demo --version $(4) \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200,210,220 \
	  --sealed-test-seed $(5) --interval-form $(7) $(call DEMO_VAL,$(1))
	$(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run$(1)/generator-frozen.pt \
	  --seed $(5) --patients 60 --cohort sealed-test --out $(DEMO_DATA)/sealed$(5)
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run$(1)/checkpoint.pt \
	  --out dicom_node/models/demo-generator.pt --name fdopa-demo --version $(4) \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200,210,220 \
	  --sealed-test-seed $(5) --interval-form $(7) $(call DEMO_VAL,$(1)) \
	  --sealed-test-benchmark $(DEMO_DATA)/sealed$(5)/summary.json
endef
demo-model: install
	$(VENV)/bin/dicom-node-train phantom-dataset --patients 1200 --seed 100 --out $(DEMO_DATA)/train-s100 --pet-layout same-grid \
	  --tumour-count-p 0.05,0.4,0.55 --normal-slice-fraction 0.25 --lean --val-patients 40 --workers 2 \
	  --t1c-ceiling 1
	# 3.0: 10 epochs from scratch (64 min on 2 cores)
	$(VENV)/bin/dicom-node-train train --dataset $(DEMO_DATA)/train-s100 --out $(DEMO_DATA)/run \
	  --target uptake --ngf 16 --ndf 32 --batch-size 8 --epochs 5 --decay-epochs 5 \
	  --tumour-oversample 2 --tumour-l1-weight 10 --lambda-l1 1000 --hflip --ema-decay 0.999 \
	  --augment-rotation-deg 10 --augment-scale 0.08 --augment-shift-px 6 --bf16 --seed 0 \
	  --threads 2 --checkpoint-every 500 --val-max-slices 512 --name fdopa-demo --version 3.0
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run/checkpoint.pt \
	  --out $(DEMO_DATA)/run/generator-3.0.pt --name fdopa-demo --version 3.0 --slice-smoothing-mm 2.4
	# 3.1: 5 more epochs from 3.0's weights with small lesions weighted up (49 min on 2 cores)
	$(VENV)/bin/dicom-node-train train --dataset $(DEMO_DATA)/train-s100 --out $(DEMO_DATA)/run31 \
	  --init-generator $(DEMO_DATA)/run/generator-3.0.pt \
	  --target uptake --ngf 16 --ndf 32 --batch-size 8 --epochs 2 --decay-epochs 3 --lr 0.0001 \
	  --tumour-oversample 2 --tumour-l1-weight 10 --tumour-margin-px 2 --lambda-l1 1000 \
	  --small-lesion-area-px 100 --small-lesion-max-gain 6 --hflip --ema-decay 0.999 \
	  --augment-rotation-deg 10 --augment-scale 0.08 --augment-shift-px 6 --bf16 --seed 0 \
	  --threads 2 --checkpoint-every 500 --val-max-slices 512 --name fdopa-demo --version 3.1
	# Smoothing along the slice normal, chosen on validation patients 0-29 by a rule fixed
	# before the sweep: most lesions found minus false foci, then per-lesion r(TBRmax).
	for mm in 0 1.2 2.4 3.6; do \
	  $(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run31/checkpoint.pt \
	    --out $(DEMO_DATA)/run31/generator-s$$mm.pt --name fdopa-demo --version 3.1 \
	    --slice-smoothing-mm $$mm --training-seeds 100 --validation-seeds 200 || exit 1; \
	  $(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run31/generator-s$$mm.pt \
	    --seed 200 --patients 30 --cohort validation --out $(DEMO_DATA)/sweep-s$$mm \
	    --uncertainty-samples 0 || exit 1; \
	done
	$(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run31/generator-s$(DEMO_SMOOTHING).pt \
	  --seed 200 --patients 60 --cohort validation --out $(DEMO_DATA)/val200 --uncertainty-samples 0
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run31/checkpoint.pt \
	  --out $(DEMO_DATA)/run31/generator-frozen.pt --name fdopa-demo --version 3.1 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING) --training-seeds 100 --validation-seeds 200 \
	  --sealed-test-seed 400 --validation-benchmark $(DEMO_DATA)/val200/summary.json
	$(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run31/generator-frozen.pt \
	  --seed 400 --patients 60 --cohort sealed-test --out $(DEMO_DATA)/sealed400
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run31/checkpoint.pt \
	  --out $(DEMO_DATA)/run31/generator-3.1.pt --name fdopa-demo --version 3.1 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING) --training-seeds 100 --validation-seeds 200 \
	  --sealed-test-seed 400 --validation-benchmark $(DEMO_DATA)/val200/summary.json \
	  --sealed-test-benchmark $(DEMO_DATA)/sealed400/summary.json
	# 3.2: 3.1's generator; the contrast gain swept on validation 0-59 (rule fixed before:
	# most found - false foci with at most 0.1 false foci per patient; 1.25 and 1.5 failed
	# the bound, so the gain stays 1), the TBR intervals calibrated on the validation
	# residual's root mean square; then a new sealed seed (500), evaluated once.
	for gain in 1.25 1.5; do \
	  $(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run31/checkpoint.pt \
	    --out $(DEMO_DATA)/run31/generator-g$$gain.pt --name fdopa-demo --version 3.2-g$$gain \
	    --slice-smoothing-mm $(DEMO_SMOOTHING) --uptake-contrast-gain $$gain || exit 1; \
	  $(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run31/generator-g$$gain.pt \
	    --seed 200 --patients 60 --cohort validation --out $(DEMO_DATA)/val200-g$$gain \
	    --uncertainty-samples 0 || exit 1; \
	done
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run31/checkpoint.pt \
	  --out $(DEMO_DATA)/run31/generator-3.2-frozen.pt --name fdopa-demo --version 3.2 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING) --training-seeds 100 --validation-seeds 200 \
	  --sealed-test-seed 500 --validation-benchmark $(DEMO_DATA)/val200/summary.json
	$(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run31/generator-3.2-frozen.pt \
	  --seed 500 --patients 60 --cohort sealed-test --out $(DEMO_DATA)/sealed500
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run31/checkpoint.pt \
	  --out $(DEMO_DATA)/run31/generator-3.2.pt --name fdopa-demo --version 3.2 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING) --training-seeds 100 --validation-seeds 200 \
	  --sealed-test-seed 500 --validation-benchmark $(DEMO_DATA)/val200/summary.json \
	  --sealed-test-benchmark $(DEMO_DATA)/sealed500/summary.json
	# 3.3: 3.2's generator fine-tuned 2 + 3 epochs on the first 480 training patients with the
	# T1C read with headroom (--t1c-ceiling 2: enhancement no longer clipped to white matter);
	# Smoothing chosen on validation 0-59 by a rule fixed before the runs: among 0, 1.2, 2.4
	# and 3.6 mm with at most 0.1 false foci per patient, the most (found - false foci), which
	# must beat 3.2's 26 (1.2 mm: 39 - 4 = 35; none had 7 false foci). Sealed seed 600, once.
	$(VENV)/bin/dicom-node-train phantom-dataset --patients 480 --seed 100 --out $(DEMO_DATA)/train-s100-c2 \
	  --tumour-count-p 0.05,0.4,0.55 --normal-slice-fraction 0.25 --lean --val-patients 24 --workers 2 \
	  --pet-layout same-grid --t1c-ceiling 2
	$(VENV)/bin/dicom-node-train train --dataset $(DEMO_DATA)/train-s100-c2 --out $(DEMO_DATA)/run33 \
	  --init-generator $(DEMO_DATA)/run31/generator-3.2.pt --target uptake --ngf 16 --ndf 32 \
	  --batch-size 8 --epochs 2 --decay-epochs 3 --lr 0.0001 --lambda-l1 1000 \
	  --tumour-oversample 2 --tumour-l1-weight 10 --tumour-margin-px 2 \
	  --small-lesion-area-px 100 --small-lesion-max-gain 6 --ema-decay 0.999 --hflip --bf16 \
	  --augment-rotation-deg 10 --augment-scale 0.08 --augment-shift-px 6 --threads 2 \
	  --checkpoint-every 500 --val-max-slices 512 --seed 0 --name fdopa-demo --version 3.3
	for mm in 0 1.2 2.4 3.6; do \
	  $(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run33/checkpoint.pt \
	    --out $(DEMO_DATA)/run33/generator-s$$mm.pt --name fdopa-demo --version 3.3-cand \
	    --slice-smoothing-mm $$mm --training-seeds 100 --validation-seeds 200 || exit 1; \
	  $(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run33/generator-s$$mm.pt \
	    --seed 200 --patients 60 --cohort validation --out $(DEMO_DATA)/val200-33-s$$mm \
	    --uncertainty-samples 0 || exit 1; \
	done
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run33/checkpoint.pt \
	  --out $(DEMO_DATA)/run33/generator-frozen.pt --name fdopa-demo --version 3.3 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200 \
	  --sealed-test-seed 600 --validation-benchmark $(DEMO_DATA)/val200-33-s$(DEMO_SMOOTHING_33)/summary.json
	$(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run33/generator-frozen.pt \
	  --seed 600 --patients 60 --cohort sealed-test --out $(DEMO_DATA)/sealed600
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run33/checkpoint.pt \
	  --out dicom_node/models/demo-generator.pt --name fdopa-demo --version 3.3 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200 \
	  --sealed-test-seed 600 --validation-benchmark $(DEMO_DATA)/val200-33-s$(DEMO_SMOOTHING_33)/summary.json \
	  --sealed-test-benchmark $(DEMO_DATA)/sealed600/summary.json
	# 3.3.1: 3.3's weights with its TBR intervals calibrated on three validation cohorts pooled
	# (seeds 200, 210, 220, 4 uncertainty passes) instead of one; the interval form (Gaussian,
	# not split-conformal) chosen by leaving one cohort out (docs/model-card.md). Sealed seed
	# 700, once.
	for seed in 200 210 220; do \
	  $(VENV)/bin/dicom-node-train benchmark --weights dicom_node/models/demo-generator.pt \
	    --seed $$seed --patients 60 --cohort validation --out $(DEMO_DATA)/val$$seed-331 \
	    --uncertainty-samples 4 || exit 1; \
	done
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run33/checkpoint.pt \
	  --out $(DEMO_DATA)/run33/generator-331-frozen.pt --name fdopa-demo --version 3.3.1 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200,210,220 \
	  --sealed-test-seed 700 --interval-form gaussian $(DEMO_VAL_331)
	$(VENV)/bin/dicom-node-train benchmark --weights $(DEMO_DATA)/run33/generator-331-frozen.pt \
	  --seed 700 --patients 60 --cohort sealed-test --out $(DEMO_DATA)/sealed700
	$(VENV)/bin/dicom-node-train export --checkpoint $(DEMO_DATA)/run33/checkpoint.pt \
	  --out dicom_node/models/demo-generator.pt --name fdopa-demo --version 3.3.1 \
	  --slice-smoothing-mm $(DEMO_SMOOTHING_33) --training-seeds 100 --validation-seeds 200,210,220 \
	  --sealed-test-seed 700 --interval-form gaussian $(DEMO_VAL_331) \
	  --sealed-test-benchmark $(DEMO_DATA)/sealed700/summary.json
	# 3.4: 3.3 fine-tuned with the tumour pinball loss (quantile 0.6) and hard negatives mined
	# on each batch at 1.4 x the slice background (L1 weight 50); its rule (found - false foci
	# above 3.3's 110 on validation seeds 200, 210, 220, at most 18 false foci) written before
	# the run; intervals calibrated on the same three cohorts. Sealed seed 800, once.
	$(call QUANTILE_RELEASE,34,run33/generator-frozen.pt,0.6,3.4,800,50,gaussian)
	# 3.5: 3.4 fine-tuned with the tumour pinball loss at quantile 0.7 (3.4: 0.6), hard negatives
	# as 3.4's; its rule (build/m10/RULE-35.md: at most 18 false foci, found - false foci at
	# least 3.4's 120, pooled TBRmax bias within +-0.25 on validation seeds 200, 210, 220)
	# written before the run; the interval form kept by leaving one cohort out; calibrated on
	# the same three cohorts. Sealed seed 900, once.
	$(call QUANTILE_RELEASE,35,run34/generator-frozen.pt,0.7,3.5,900,50,gaussian)
	# 3.6: 3.5 fine-tuned with the tumour quantile at 0.8 and the hard negatives' weight
	# doubled to 100 (candidate G2; G1, quantile 0.8 at weight 50, invented 22 foci and was
	# rejected); its rule (build/m11/RULE-38.md: at most 18 false foci, found - false foci at
	# least 3.5's 125, pooled TBRmax bias within +-0.25 and closer to zero than 3.5's -0.195 on
	# validation seeds 200, 210, 220) written before its run; leaving one cohort out picked the
	# shifted interval form. Sealed seed 1000, once.
	$(call QUANTILE_RELEASE,36,run35/generator-frozen.pt,0.8,3.6,1000,100,shifted)

clean:
	rm -rf var build *.egg-info
