# cratescale: the two commands a newcomer runs are `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
TORCH   := torch==2.13.0
DALI    ?= dali-cpu
STAMP   := .venv/.setup-done

.PHONY: setup demo test test-fast slurm-up slurm-down bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and alone: the CPU build; every later call repeats the pin so no CUDA torch is resolved.
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(TORCH) -e '.[$(DALI),dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m cratescale.launch jobs/demo.yaml

test: setup
	bash tests/run.sh

test-fast: setup
	$(PY) -m pytest -q tests/unit

slurm-up:
	bash cluster/dev/slurm_up.sh

slurm-down:
	bash cluster/dev/slurm_down.sh

clean:
	rm -rf runs .pytest_cache
