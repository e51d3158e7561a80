# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv when missing and install what they need from the requirements files.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

# Offline by design: nothing at test or demo time may reach a model hub.
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: test test-numeric demo bench clean-venv

$(STAMP): requirements.txt requirements-test.txt requirements-torch.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The float32-sensitive tests again on another numeric path (the AVX2 kernels of MKL, oneDNN and ATen, MKL's
# reproducible mode): what another CPU would compute. CI (.ci/run) runs it after `make test`.
NUMERIC_PATH := MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2

test-numeric: $(STAMP)
	env $(NUMERIC_PATH) $(PY) -m pytest -q -m numeric tests

demo: $(STAMP)
	$(PY) scripts/demo.py $(ARGS)

bench: $(STAMP)
	$(PY) bench/bench_align.py
	$(PY) bench/bench_render.py

clean-venv:
	rm -rf $(VENV)
