.PHONY: setup demo test bench lock clean

VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/pixelrefer demo

test: setup
	$(PY) -m pytest -q --durations=25

bench: setup
	$(PY) -m bench.flops
	$(PY) -m bench.decode
	$(PY) -m bench.tracker

# Re-resolve every dependency to its newest release allowed by pyproject.toml (torch as pinned in
# requirements/constraints.in), for Python >= 3.11 on every platform, with hashes. Then run
# `make test` before committing requirements.lock: the lock is what CI and every fresh machine get.
lock:
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --upgrade -c requirements/constraints.in --override requirements/overrides.txt --custom-compile-command "make lock" \
		-o requirements.lock
	$(VENV)/bin/uv pip compile requirements/datumaro.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --upgrade --custom-compile-command "make lock" -o requirements/datumaro.lock

clean:
	rm -rf demo-output .pytest_cache
