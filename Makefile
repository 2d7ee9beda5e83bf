# The two commands a newcomer types: `make demo` and `make test`.
# Both install into .venv first (idempotent: re-installs only when pyproject.toml changes).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install system-deps bench clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

# Slurm's daemons for tests/test_slurm.py (a one-host cluster the test starts itself): installed
# with apt-get when missing, where we are root and apt-get exists (a fresh CI machine); quiet, and
# a no-op once they are there.
system-deps:
	@if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Slurm (slurmctld slurmd slurm-client munge) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; \
	  else \
	    echo "Slurm is missing and cannot be installed here (needs root and apt-get): tests/test_slurm.py will fail"; \
	  fi; \
	fi

install: $(STAMP) system-deps

demo: $(STAMP)
	$(VENV)/bin/vitpipe demo

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/model_step.py
	$(VENV)/bin/python benchmarks/shard_throughput.py
	$(VENV)/bin/python benchmarks/train_step.py
	$(VENV)/bin/python benchmarks/input_pipeline.py

clean:
	rm -rf $(VENV) .vitpipe build *.egg-info
