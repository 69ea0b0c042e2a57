# The two set-up commands of the README; each installs what it needs into .venv first.
#   make demo   train, evaluate and sample one tiny expert per domain (about 15 minutes on 2 CPU cores)
#   make test   the test suite (a few minutes; no GPU, no network)
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test bench clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch 2.13.0 first: an unpinned torch would pull several GB of CUDA packages
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/expandlm demo --out runs/demo

# the web page's test drives Debian's chromium; installed here when missing and we are root
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)); } || \
	  echo "chromium is missing and cannot be installed here: tests/test_web.py will be skipped"

test: $(STAMP) chromium
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
