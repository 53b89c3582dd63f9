# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision first, pinned: on our machines they install from local disk (see README).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast bench clean

# --no-compile: pip would byte-compile every file it installs (torch, ray, pyspark: 75 of the 170 s measured
# here); Python compiles each module on its first import instead and keeps the result, which it would not
# where the environment sets PYTHONDONTWRITEBYTECODE (ours does): so that is not passed on.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile $(TORCH)
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transfer demo

# Two pytest-xdist workers (a test file each at a time; the heavy fixtures are built once for both).
WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

# The edit-test loop: everything but the slow end-to-end tests (marked `slow`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/extract_throughput.py
	$(PY) -m pip install --quiet --no-deps 'img2vec_pytorch>=1.0.2'
	$(PY) benchmarks/peer_throughput.py
	$(PY) benchmarks/extract_memory.py
	$(PY) benchmarks/fit_memory.py
	$(PY) benchmarks/write_cache_memory.py
	$(PY) benchmarks/export_speed.py
	$(PY) benchmarks/predict_vs_extract.py
	$(PY) benchmarks/fold_speed.py
	$(PY) benchmarks/shards_vs_folder.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
