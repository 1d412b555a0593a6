# Two entry points (see README): `make demo` and `make test`.
# Each creates its own virtual environment in .venv (override with VENV=...).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
MODEL ?=  # with DATA: the backbone whose ImageNet features index it (resnet50, vgg16, inceptionv3[:SIZE])
OUT ?= out
DEMO ?= $(OUT)/demo
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: demo demo-build demo-check test lint venv clean

$(BIN)/imgsim: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(BIN)/imgsim

# The demo. `make demo`: CIFAR-10 (../shared/data, else Keras' download), a fine-tuned ResNet50,
# its index, the service. `make demo DATA=~/photos`: your own folder of images, ImageNet
# features (no training), its index, the service. Steps whose output exists are skipped.
demo: demo-build
	$(BIN)/imgsim serve --model $$(cut -d' ' -f1 $(DEMO)/serve) --index $$(cut -d' ' -f2 $(DEMO)/serve) --host $(HOST) --port $(PORT)

demo-build: venv
	bash scripts/demo-build.sh $(BIN) $(DEMO) "$(DATA)" "$(MODEL)"

# Start the demo service in the background, wait for /readyz, search with a test photo, stop.
demo-check: demo-build
	bash scripts/demo-check.sh $(BIN) $(DEMO) $(PORT)

test: venv
	$(BIN)/python -m pytest -q

# Before every commit, and in CI: ruff's rule set and format, mypy, module and function sizes.
LINTED := app indexer models tests benchmarks scripts
lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/python scripts/check_sizes.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

# ---- CIFAR-10 results (docs/results.md): long CPU runs, not part of CI -------------
CIFAR ?= ../shared/data/cifar10-jpg.tar.gz
RUNS ?= runs

.PHONY: cifar10-resnet50 cifar10-vgg16 cifar10-inceptionv3 cifar10-simple-cnn cifar10-ensemble cifar10-results
cifar10-resnet50: venv
	$(BIN)/imgsim train --backbone resnet50 --data $(CIFAR) --out $(RUNS)/resnet50-cifar10 --input-size 128 \
	  --trainable last-block --flip --shift 1 --mixed-precision --lr-schedule cosine --label-smoothing 0.1 \
	  --epochs 6 --patience 3 --learning-rate 3e-4
cifar10-vgg16: venv
	$(BIN)/imgsim train --backbone vgg16 --data $(CIFAR) --out $(RUNS)/vgg16-cifar10 --input-size 64 \
	  --trainable last-block --flip --mixed-precision --lr-schedule cosine --label-smoothing 0.1 \
	  --epochs 6 --patience 3 --learning-rate 3e-4
cifar10-inceptionv3: venv
	$(BIN)/imgsim train --backbone inceptionv3 --data $(CIFAR) --out $(RUNS)/inceptionv3-cifar10 --input-size 171 \
	  --trainable last-block --flip --mixed-precision --lr-schedule cosine --label-smoothing 0.1 \
	  --epochs 6 --patience 3 --learning-rate 3e-4
cifar10-simple-cnn: venv
	$(BIN)/imgsim train --backbone simple-cnn --data $(CIFAR) --out $(RUNS)/simple-cnn-cifar10 --input-size 32 \
	  --epochs 8 --patience 3 --learning-rate 1e-3
cifar10-ensemble: venv
	$(BIN)/imgsim evaluate-ensemble --data $(CIFAR) --model $(RUNS)/vgg16-cifar10 --model $(RUNS)/resnet50-cifar10 \
	  --model $(RUNS)/inceptionv3-cifar10 --json $(RUNS)/ensemble.json --report $(RUNS)/ensemble
INDEXES ?= indexes
cifar10-index-%: venv
	$(BIN)/imgsim index build --model $(RUNS)/$*-cifar10 --data $(CIFAR) --out $(INDEXES)/$*-cifar10
	$(BIN)/imgsim evaluate --model $(RUNS)/$*-cifar10 --index $(INDEXES)/$*-cifar10 --data $(CIFAR) \
	  --json $(RUNS)/$*-cifar10-retrieval.json --plot $(RUNS)/$*-cifar10-retrieval.png
# The approximate (HNSW) index the benchmarks serve from, with its recall@5 against exact search.
cifar10-hnsw-%: venv
	$(BIN)/imgsim index build --model $(RUNS)/$*-cifar10 --data $(CIFAR) --out $(INDEXES)/$*-cifar10-hnsw --index-type hnsw
	$(BIN)/imgsim evaluate --model $(RUNS)/$*-cifar10 --index $(INDEXES)/$*-cifar10-hnsw --data $(CIFAR) \
	  --json $(RUNS)/$*-cifar10-hnsw-retrieval.json
# The same with float16 vectors (half the memory; same retrieval metrics on CIFAR-10).
cifar10-hnsw16-%: venv
	$(BIN)/imgsim index build --model $(RUNS)/$*-cifar10 --data $(CIFAR) --out $(INDEXES)/$*-cifar10-hnsw16 --index-type hnsw-fp16
	$(BIN)/imgsim evaluate --model $(RUNS)/$*-cifar10 --index $(INDEXES)/$*-cifar10-hnsw16 --data $(CIFAR) \
	  --json $(RUNS)/$*-cifar10-hnsw16-retrieval.json
# Flip test-time augmentation: items and queries embedded as image + mirror image (docs/results.md).
cifar10-tta-%: venv
	$(BIN)/imgsim index build --model $(RUNS)/$*-cifar10 --data $(CIFAR) --out $(INDEXES)/$*-cifar10-flip --tta flip
	$(BIN)/imgsim evaluate --model $(RUNS)/$*-cifar10 --index $(INDEXES)/$*-cifar10-flip --data $(CIFAR) \
	  --json $(RUNS)/$*-cifar10-flip-retrieval.json --plot $(RUNS)/$*-cifar10-flip-retrieval.png
cifar10-results: cifar10-resnet50 cifar10-vgg16 cifar10-simple-cnn cifar10-ensemble \
	cifar10-index-resnet50 cifar10-index-vgg16 cifar10-hnsw-resnet50 cifar10-hnsw-vgg16 \
	cifar10-hnsw16-resnet50 cifar10-hnsw16-vgg16 \
	cifar10-tta-resnet50 cifar10-tta-vgg16

# ---- Container check (issue: docker-compose must come up offline) ---------------------
# The shared tool takes the first http(s)://.../debian URL it finds in the apt sources. On
# these machines that is a commented-out snapshot.debian.org address that does not resolve,
# and it also greps /etc/apt/sources.list, which may not exist (a silent exit under
# pipefail). A disabled deb822 entry with the working mirror, sorted first, fixes both
# without changing what apt itself uses.
.PHONY: container-check
container-check:
	@[ -e /etc/apt/sources.list ] || touch /etc/apt/sources.list
	@[ -e /etc/apt/sources.list.d/00-container-check-mirror.sources ] || printf '%s\n' \
	  '# First mirror URL for shared/tools/container-check.sh; disabled for apt itself.' \
	  'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' 'Components: main' 'Enabled: no' \
	  > /etc/apt/sources.list.d/00-container-check-mirror.sources
	bash scripts/container-check.sh

# ---- Benchmarks (docs/benchmarks.md): long CPU runs on an otherwise idle machine, not CI ----
# Pairs of MODEL_DIR and INDEX_DIR, in the same order; extra options via BENCH_ARGS,
# e.g. `make bench BENCH_ARGS=--quick` (smoke run, written to out/benchmarks-quick.md).
# By default the FAISS step (20-30 min, mostly 1M-vector HNSW builds) keeps its results from
# docs/benchmarks.json; `make bench BENCH_ARGS=` measures it too.
BENCH_MODELS ?= runs/resnet50-cifar10 runs/vgg16-cifar10 runs/inceptionv3-cifar10-171
BENCH_INDEXES ?= indexes/resnet50-cifar10-hnsw16 indexes/vgg16-cifar10-hnsw16 indexes/inceptionv3-cifar10-hnsw16
BENCH_ARGS ?= --skip faiss --keep docs/benchmarks.json --requests 1000
.PHONY: bench
bench: venv
	$(BIN)/python -m benchmarks.run_all \
	  $(foreach p,$(join $(addsuffix :,$(BENCH_MODELS)),$(BENCH_INDEXES)),--model $(word 1,$(subst :, ,$(p))) --index $(word 2,$(subst :, ,$(p)))) \
	  $(BENCH_ARGS)
