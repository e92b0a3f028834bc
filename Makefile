# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# CPU-sized torch from the package index (or the local wheelhouse); a CUDA build works too.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The offline LPIPS backbone, where the shared data sits beside the checkout.
LPIPS_BACKBONE ?= $(wildcard ../shared/weights/lpips-alexnet-features.pth)

demo: $(STAMP)
	UNLEARNSHIELD_LPIPS_BACKBONE=$(LPIPS_BACKBONE) $(BIN)/unlearnshield demo

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/attack_engines.py

clean:
	rm -rf runs .pytest_cache build *.egg-info
