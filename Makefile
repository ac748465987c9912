# `make` sets up .venv (first time only) and runs the main job on the built-in demo brains;
# `make test` sets up .venv with the test extras and runs the test suite. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test
demo: $(VENV)/.runtime-installed
	$(PY) dataset.py
	$(PY) pre_train.py --MODE=VQVAE
	$(PY) pre_train.py --MODE=VAE
	$(PY) latent_dataset.py --FIRST_STAGE=vqvae
	$(PY) train_viT.py
	$(PY) stable_diffusion.py
	$(PY) predict.py
	$(PY) logger.py

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q tests

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(VENV)/.runtime-installed
