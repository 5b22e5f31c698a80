# tinyslim: two commands do all set-up on a fresh machine.
#   make test   create .venv, install tinyslim (editable) with its test extras, build the extension, run the suite
#   make demo   create .venv, install tinyslim (editable), build the extension, run `python -m tinyslim demo`
# Other targets: make info, make bench, make gpu-check, make clean.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check
# torch is a test-only dependency; this pin is the CPU build that installs quickly (see README).
TORCH  := torch==2.13.0

.PHONY: test demo info bench gpu-check clean ext

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel "cffi>=1.15"

# Runtime install; re-run when the build inputs change. The extension is (re)built in place.
$(VENV)/.runtime: $(VPY) setup.py pyproject.toml $(wildcard ext/*)
	$(PIP) install -q --no-build-isolation -e .
	$(VPY) setup.py -q build_ext --inplace
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install -q $(TORCH) pytest hypothesis
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

ext: $(VENV)/.runtime
	$(VPY) setup.py -q build_ext --inplace

test: $(VENV)/.test
	$(VPY) -m pytest -q

demo: $(VENV)/.runtime
	$(VPY) -m tinyslim demo

info: $(VENV)/.runtime
	$(VPY) -m tinyslim info

bench: $(VENV)/.test
	$(VPY) -m tinyslim bench train-step
	$(VPY) -m tinyslim bench kernels

# Every GPU check and benchmark in one call (for whoever has a GPU).
gpu-check: $(VENV)/.test
	$(VPY) -m tinyslim info
	$(VPY) -m pytest -q tests -k cuda
	$(VPY) -m tinyslim bench kernels --device cuda

clean:
	rm -rf build $(VENV) *.egg-info tinyslim/*.so tinyslim/kernels/*.so
