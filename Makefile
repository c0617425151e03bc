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

# NODES=1 (default): the single-node cluster the tiers use. NODES=N>1: an N-node cluster, one network
# namespace per node (cluster/dev/mn_up.sh; clients need SLURM_CONF=/var/lib/cratescale-slurm-mn/etc/slurm.conf).
NODES ?= 1
slurm-up:
	if [ "$(NODES)" -gt 1 ]; then bash cluster/dev/slurm_up.sh >/dev/null && NODES=$(NODES) bash cluster/dev/mn_up.sh; \
	else bash cluster/dev/slurm_up.sh; fi

# Stops both clusters, by pid.
slurm-down:
	bash cluster/dev/mn_down.sh
	bash cluster/dev/slurm_down.sh

clean:
	rm -rf runs .pytest_cache
