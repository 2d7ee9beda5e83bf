# The two commands a newcomer types: `make demo` and `make test`.
# Both install into .venv first (idempotent: re-installs only when pyproject.toml changes).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitpipe demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/model_step.py
	$(VENV)/bin/python benchmarks/shard_throughput.py
	$(VENV)/bin/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .vitpipe build *.egg-info
