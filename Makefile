# Two quickstart targets; each works on a fresh machine by itself.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The same environment and command as .ci/run.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q -p no:cacheprovider

demo: install
	HF_HUB_OFFLINE=1 $(PY) recipes/lm_data_mixture.py --output_dir outputs/lm_data_mixture

lint: install
	$(VENV)/bin/ruff check .

.PHONY: install test demo lint
