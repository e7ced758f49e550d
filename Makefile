# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup setup-python setup-chromium demo test

# torch and torchvision are pinned for this project's machines only; pyproject declares ranges.
setup: setup-python setup-chromium

setup-python:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev,export]' 'transformers==5.18.0'

# The demo needs no browser: only the report test does.
demo: setup-python
	bash scripts/demo.sh

test: setup
	$(PYTHON) -m pytest -q -x --durations=15 tests

# tests/test_explain.py opens the explain report in headless Chromium. Installed only where it is
# missing and apt-get exists (Debian/Ubuntu, as root or with sudo); elsewhere that test is skipped.
setup-chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "setup-chromium: no apt-get; install chromium yourself to run the report test"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; fi
