# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/medreid.toml

.PHONY: install lock run migrate test lint typecheck check clean models models-whitening models-real \
	bench

# requirements.lock pins every package (pyproject.toml's ranges resolved for Python 3.11 on
# Linux x86_64), so two installs a month apart are the same; `make lock` resolves it again.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lock:
	$(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv pip compile pyproject.toml --extra test --extra training --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
		--quiet -o requirements.lock

install: $(STAMP)

migrate: install
	$(BIN)/medreid --config $(CONFIG) db upgrade

run: migrate
	$(BIN)/medreid --config $(CONFIG) serve

# Most tests wait on processes and sockets, so TEST_WORKERS processes run them side by side
# (each file's tests in one process, with its module fixtures); the tests marked `alone`
# measure time to the second and run after them, by themselves. TEST_WORKERS=0: all in one.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not alone"
	$(BIN)/python -m pytest -q -ra -m alone

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

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
	$(BIN)/python -m benchmarks.hostile_peers
	$(BIN)/python -m benchmarks.request_race
	$(BIN)/python -m benchmarks.time_to_people
	$(BIN)/python -m benchmarks.priors
	$(BIN)/python -m benchmarks.compa_cv

# The default models: COMPA and one re-identification model per modality, trained on generated
# hospitals never used for evaluation: COMPA on seeds 21 and 22 plus the real images beside the
# checkout when they are there (then HAM10000 makes it non-commercial, and its card says so;
# without them it is the generated set's alone); X-ray on seed 21; MRI on seed 22 (series of three slices spread
# over the volume); CT on seed 25 (300 patients, the same series); dermoscopy on seed 26 (1,000
# patients, rotations to 30 degrees as lesions turn between visits). ImageNet initialisation
# from IMAGENET when that file exists. Each fine-tuned network (kept under MODELS_BASE) is then
# followed by a within-class whitening of its embeddings fitted on 200 other patients (seed 24):
# models-whitening writes the served models into MODELS_DIR.
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
	$(BIN)/medreid synth --out $(MODELS_DATA)/ct300 --patients 300 --visits 3 --slices 3 \
		--seed 25 --modalities ct
	$(BIN)/medreid synth --out $(MODELS_DATA)/derm1000 --patients 1000 --visits 3 --seed 26 \
		--modalities dermoscopy
	weights=$$(test -f $(IMAGENET) && echo $(IMAGENET) || echo none); \
	real=$$(test -d $(REAL) && echo $(REAL)); \
	$(BIN)/medreid train compa $(MODELS_DATA)/train $(MODELS_DATA)/volumes $$real \
		--out $(MODELS_DIR) \
		--backbone-weights $$weights --version $(MODELS_VERSION) && \
	$(BIN)/medreid train reid --modality xray $(MODELS_DATA)/train/xray \
		--out $(MODELS_BASE) --backbone-weights $$weights --epochs 15 --version v1 && \
	$(BIN)/medreid train reid --modality mri $(MODELS_DATA)/volumes/mri \
		--out $(MODELS_BASE) --backbone-weights $$weights --epochs 15 --version v1 && \
	$(BIN)/medreid train reid --modality ct $(MODELS_DATA)/ct300/ct \
		--out $(MODELS_BASE) --backbone-weights $$weights --epochs 15 --version n2 && \
	$(BIN)/medreid train reid --modality dermoscopy $(MODELS_DATA)/derm1000/dermoscopy \
		--out $(MODELS_BASE) --backbone-weights $$weights --epochs 20 --rotation 30 \
		--version n3
	$(MAKE) models-whitening
	$(MAKE) models-real

# With the real images beside the checkout (REAL) and the ImageNet weights, the X-ray and
# dermoscopy models served are trained on the real images instead, with the recipe that
# benchmarks.reid_cv chose by identity-disjoint cross-validation: the ImageNet backbone kept
# as it is, inner layers pooled on a grid, a within-class whitening fitted on 80% of the
# identities and the threshold calibrated on the other 20%. Trained last, so they are the
# newest and serve. The dermoscopy model inherits HAM10000's non-commercial licence.
REAL_XRAY_LAYERS := block_6_expand_relu,block_10_expand_relu,block_13_expand_relu
REAL_DERMOSCOPY_LAYERS := block_10_expand_relu,block_13_expand_relu
models-real: install
	@if test -d $(REAL) && test -f $(IMAGENET); then \
		rm -rf $(MODELS_DIR)/reid-xray-v4 $(MODELS_DIR)/reid-dermoscopy-v5; \
		$(BIN)/medreid train reid --modality xray $(REAL)/xray --out $(MODELS_DIR) \
			--recipe frozen --size 192 --feature-layers $(REAL_XRAY_LAYERS) --grid 4 \
			--backbone-weights $(IMAGENET) --version v4 && \
		$(BIN)/medreid train reid --modality dermoscopy $(REAL)/dermoscopy --out $(MODELS_DIR) \
			--recipe frozen --size 128 --feature-layers $(REAL_DERMOSCOPY_LAYERS) --grid 2 \
			--flips horizontal --fit-flips vertical \
			--backbone-weights $(IMAGENET) --version v5; \
	else \
		echo "models-real: $(REAL) or $(IMAGENET) is missing; the generated-data models serve"; \
	fi

models-whitening: install
	$(BIN)/medreid synth --out $(MODELS_DATA)/whitening --patients 200 --visits 3 --slices 3 \
		--seed 24
	for spec in xray:v1:v2 ct:n2:v3 mri:v1:v3 dermoscopy:n3:v3; do \
		modality=$${spec%%:*}; rest=$${spec#*:}; base=$${rest%%:*}; version=$${rest#*:}; \
		rm -rf $(MODELS_DIR)/reid-$$modality-$$version; \
		$(BIN)/medreid train whitening --model $(MODELS_BASE)/reid-$$modality-$$base \
			$(MODELS_DATA)/whitening/$$modality --out $(MODELS_DIR) --version $$version \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) var build *.egg-info
