# tinyslim: two commands do all set-up on a fresh machine.
#   make test   create .venv, install tinyslim (editable) with its test extras, build the extension, run the suite
#               (derandomized: the same hypothesis examples every run; `make test-explore` draws fresh ones)
#   make demo   create .venv, install tinyslim (editable), build the extension, run `python -m tinyslim demo`
#               (every method in the three worlds, one seed: runs/demo/report.md + plots; the README's
#               "What you will see" gives its measured run time)
# Other targets: make test-explore, make info, make bench, make gpu-check, make sanitize, make clean.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check

.PHONY: test test-explore demo info bench gpu-check sanitize clean ext

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel "cffi>=1.15"

# Runtime install; re-run when the build inputs change. The extension is (re)built in place.
$(VENV)/.runtime: $(VPY) setup.py pyproject.toml $(wildcard ext/*.c ext/*.h ext/*.cu ext/*.py)
	$(PIP) install -q --no-build-isolation -e .
	$(VPY) setup.py -q build_ext --inplace
	touch $@

# The test extras (setup.py's extras_require["test"], the one list): torch, pytest, hypothesis, the real
# transformers and peft, and jupytext, nbclient, ipykernel for the notebook test. Re-run when the list changes.
$(VENV)/.test: $(VENV)/.runtime setup.py
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

ext: $(VENV)/.runtime
	$(VPY) setup.py -q build_ext --inplace

# Derandomized (hypothesis profile ci): the same examples on every run, so it never fails at random.
test: $(VENV)/.test
	HYPOTHESIS_PROFILE=ci $(VPY) -m pytest -q

# Random exploration (profile dev): fresh hypothesis examples on every run; SEED=N replays one run,
# ARGS narrows it, e.g. make test-explore SEED=3 ARGS=tests/test_ops.py
test-explore: $(VENV)/.test
	HYPOTHESIS_PROFILE=dev $(VPY) -m pytest -q $(if $(SEED),--hypothesis-seed=$(SEED)) $(ARGS)

# One BLAS thread: the model's matrices are small, and the runs go to one worker process per core.
demo: $(VENV)/.runtime
	OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} $(VPY) -m tinyslim demo

info: $(VENV)/.runtime
	$(VPY) -m tinyslim info

bench: $(VENV)/.test
	$(VPY) -m tinyslim bench train-step
	$(VPY) -m tinyslim bench kernels

# Every GPU check and benchmark in one call (for whoever has a GPU).
gpu-check: $(VENV)/.test
	$(VPY) -m tinyslim info
	$(VPY) -m pytest -q tests -k cuda
	compute-sanitizer --tool memcheck $(VPY) -m pytest -q tests/test_kernels_cuda.py
	$(VPY) -m tinyslim bench kernels --device cuda

# The C kernels under AddressSanitizer, over the kernel and reliability tests (about 75 s). It builds
# in a scratch copy so the in-place module is left alone.
SAN := build/sanitize
sanitize: $(VENV)/.test
	rm -rf $(SAN) && mkdir -p $(SAN)
	tar --exclude=./.venv --exclude=./build --exclude=./runs --exclude=./.git --exclude='*.so' --exclude='*.o' -cf - . | tar -xf - -C $(SAN)
	cd $(SAN) && CC="gcc -fsanitize=address -fno-omit-frame-pointer -g" TINYSLIM_NO_CUDA=1 $(abspath $(VPY)) setup.py -q build_ext --inplace --force
	cd $(SAN) && ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	  PYTHONMALLOC=malloc PYTHONPATH=. HYPOTHESIS_PROFILE=ci TINYSLIM_BACKEND=cpu TINYSLIM_ASAN=1 \
	  $(abspath $(VPY)) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_reliability.py -k "not cuda"

clean:
	rm -rf build $(VENV) *.egg-info tinyslim/*.so tinyslim/kernels/*.so
