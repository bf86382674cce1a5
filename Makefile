.PHONY: setup demo test bench clean

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/pixelrefer demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.flops
	$(PY) -m bench.decode
	$(PY) -m bench.tracker

clean:
	rm -rf demo-output .pytest_cache
