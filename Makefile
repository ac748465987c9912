# `make` sets up .venv (first time only) and runs the main job on the built-in demo brains;
# `make test` sets up .venv with the test extras and runs the test suite. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test gpu
demo: $(VENV)/.runtime-installed
	$(PY) dataset.py
	$(PY) train_critic.py
	$(PY) pre_train.py --MODE=VQVAE
	$(PY) pre_train.py config/pre_train_vae.py
	$(PY) latent_dataset.py --FIRST_STAGE=vqvae
	$(PY) train_viT.py
	$(PY) stable_diffusion.py
	$(PY) predict.py
	$(PY) logger.py

# the whole pipeline with the GPU presets (config/*_gpu.py) at 256x256; DATA_DIR=/path/to/oasis for OASIS
DATA_DIR ?=
DATA := $(if $(DATA_DIR),--DATA_DIR=$(DATA_DIR),)
gpu: $(VENV)/.runtime-installed
	$(if $(DATA_DIR),,$(PY) dataset.py)
	$(PY) train_critic.py config/train_critic_gpu.py $(DATA)
	$(PY) pre_train.py config/pre_train_gpu.py $(DATA)
	$(PY) latent_dataset.py --FIRST_STAGE=vqvae256
	$(PY) train_viT.py config/train_viT_gpu.py
	$(PY) stable_diffusion.py config/stable_diffusion_gpu.py
	$(PY) predict.py config/predict_gpu.py
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
