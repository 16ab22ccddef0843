# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/medreid.toml

.PHONY: install run migrate test lint typecheck check clean models models-whitening bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(BIN)/medreid --config $(CONFIG) db upgrade

run: migrate
	$(BIN)/medreid --config $(CONFIG) serve

test: install
	$(BIN)/python -m pytest -q -ra

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy .

check: lint test

# Measurements that take minutes (not tests): each prints its figures as JSON beside its
# baseline or target; ingest and pipeline throughput also keep theirs (and a plot) under
# benchmarks/results/. See benchmarks/README.md.
bench: install
	$(BIN)/python -m benchmarks.ingest
	$(BIN)/python -m benchmarks.pipeline_throughput
	$(BIN)/python -m benchmarks.scale_out
	$(BIN)/python -m benchmarks.gallery_search
	$(BIN)/python -m benchmarks.embedding_speed
	$(BIN)/python -m benchmarks.verdict_rates
	$(BIN)/python -m benchmarks.console_pages

# The default models: COMPA and one re-identification model per modality, trained on generated
# hospitals never used for evaluation (seed 21; CT and MRI from seed 22, whose series have three
# slices spread over the volume; dermoscopy from seed 23, twice the patients, rotations to 30
# degrees as its lesions turn between visits) plus, for COMPA, the real images beside the
# checkout when they are there. ImageNet initialisation from IMAGENET when that file exists.
# Each fine-tuned network (kept under MODELS_DATA/base) is then followed by a within-class
# whitening of its embeddings fitted on 200 other patients (seed 24): models-whitening.
MODELS_DIR  ?= models
MODELS_DATA ?= var/models-data
MODELS_BASE ?= $(MODELS_DATA)/base
MODELS_VERSION ?= v1
IMAGENET ?= ../shared/weights/mobilenet_v2_1.0_224_torchvision_imagenet.weights.h5
REAL ?= ../shared/data/real
models: install
	$(BIN)/medreid synth --out $(MODELS_DATA)/train --patients 300 --visits 3 --slices 1 --seed 21
	$(BIN)/medreid synth --out $(MODELS_DATA)/volumes --patients 150 --visits 3 --slices 3 \
		--seed 22 --modalities ct,mri
	$(BIN)/medreid synth --out $(MODELS_DATA)/derm600 --patients 600 --visits 3 --seed 23 \
		--modalities dermoscopy
	weights=$$(test -f $(IMAGENET) && echo $(IMAGENET) || echo none); \
	real=$$(test -d $(REAL) && echo $(REAL)); \
	$(BIN)/medreid train compa $(MODELS_DATA)/train $(MODELS_DATA)/volumes $$real \
		--out $(MODELS_DIR) \
		--backbone-weights $$weights --version $(MODELS_VERSION) && \
	$(BIN)/medreid train reid --modality xray $(MODELS_DATA)/train/xray \
		--out $(MODELS_BASE) --backbone-weights $$weights --epochs 15 \
		--version $(MODELS_VERSION) && \
	$(BIN)/medreid train reid --modality dermoscopy $(MODELS_DATA)/derm600/dermoscopy \
		--out $(MODELS_BASE) --backbone-weights $$weights --epochs 20 --rotation 30 \
		--version v2 && \
	for modality in ct mri; do \
		$(BIN)/medreid train reid --modality $$modality $(MODELS_DATA)/volumes/$$modality \
			--out $(MODELS_BASE) --backbone-weights $$weights --epochs 15 \
			--version $(MODELS_VERSION) || exit 1; \
	done
	$(MAKE) models-whitening

models-whitening: install
	$(BIN)/medreid synth --out $(MODELS_DATA)/whitening --patients 200 --visits 3 --slices 3 \
		--seed 24
	for spec in xray:v1:v2 ct:v1:v2 mri:v1:v2 dermoscopy:v2:v3; do \
		modality=$${spec%%:*}; rest=$${spec#*:}; base=$${rest%%:*}; version=$${rest#*:}; \
		$(BIN)/medreid train whitening --model $(MODELS_BASE)/reid-$$modality-$$base \
			$(MODELS_DATA)/whitening/$$modality --out $(MODELS_DIR) --version $$version \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) var build *.egg-info
