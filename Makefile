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

# ---- notebooks -------------------------------------------------------------------------------------------------
# `make reproduce` runs every notebook under papermill (PROFILE=smoke|quick|paper); the executed copies go to
# results/notebooks/, figures to figures/, tables to results/tables/. Each notebook's target is its main figure,
# figures/<notebook>.png, rebuilt when the notebook or the library changes; heavy results come from the results
# store, so a rerun takes seconds. After switching PROFILE, force a rebuild: make -B reproduce PROFILE=paper.
# NOTEBOOK_PARAMS adds papermill parameters, e.g. NOTEBOOK_PARAMS="-p compute False" draws the accuracy notebooks
# from what the results store already holds while a long sweep is still running.
# MODEL points the notebooks at another model than the profile's (a folder, a name under $ANY4_DATA/models or a
# hub id), e.g. make -B reproduce PROFILE=paper MODEL=/tmp/any4_standins/llama-3.2-1b-standin.
PROFILE ?= quick
MODEL ?=
NOTEBOOK_PARAMS ?=
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
NOTEBOOK_FIGURES := $(patsubst notebooks/%.ipynb,figures/%.png,$(NOTEBOOKS))
LIBRARY := $(wildcard any4lib/*.py any4lib/*/*.py)
NOTEBOOK_ENV := PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}

.PHONY: figures strip-notebooks

reproduce: $(NOTEBOOK_FIGURES)

figures: reproduce

figures/%.png: notebooks/%.ipynb $(LIBRARY)
	@mkdir -p results/notebooks
	$(NOTEBOOK_ENV) $(PYTHON) -m papermill $< results/notebooks/$*.ipynb --cwd notebooks -p profile $(PROFILE) \
		$(if $(MODEL),-p model $(MODEL)) $(NOTEBOOK_PARAMS) --log-level WARNING --no-progress-bar
	@test -s $@ || { echo "$< ran but did not write $@" >&2; exit 1; }

# Notebook 06's sliders need a live frontend; under papermill the explorer draws its figure once.
figures/06_lut_explorer.png: NOTEBOOK_PARAMS += -p interactive False

# Notebook 05 plots what the GPU benchmarks wrote: a new CSV there redraws it.
figures/05_kernel_speedups.png: $(wildcard results/kernels/*.csv results/e2e/*.csv)

strip-notebooks:
	$(PYTHON) scripts/strip_notebooks.py

lab:
	$(NOTEBOOK_ENV) $(PYTHON) -m jupyter lab notebooks/
