# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup demo test

# torch and torchvision are pinned for this project's machines only; pyproject declares ranges.
setup:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev,export]' 'transformers==5.18.0'

demo: setup
	bash scripts/demo.sh

test: setup
	$(PYTHON) -m pytest -q -x --durations=15 tests
