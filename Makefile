# any4 lab. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
# The local CPU wheel; a GPU user with a CUDA torch already installed keeps theirs
# (the line below installs torch only when none is importable).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-gpu reproduce lab clean-results

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -q -ra

# On a machine with a GPU: runs the tests marked `gpu` (skipped elsewhere).
test-gpu:
	$(PYTHON) -m pytest -q -ra -m gpu

lab:
	$(PYTHON) -m jupyter lab notebooks/
