# Thin wrapper over the CMake presets. Each target installs missing Debian packages first.
#   make study   build, then run `keysel study` on the built-in default workload
#   make test    build, then run every test through ctest (the Python tests too: ctest's python.pytest)
#   make pytest  build the Python package only and run tests/python
#   make asan    the same tests under AddressSanitizer + UndefinedBehaviorSanitizer
PRESET ?= default
JOBS ?= $(shell nproc)
export PATH := $(PATH):/usr/local/cuda/bin
BUILD_DIR = $(if $(filter default,$(PRESET)),build,build-$(PRESET))

.PHONY: deps configure build study test pytest asan clean

deps:
	bash scripts/install-deps.sh

configure: deps
	cmake --preset $(PRESET)

build: configure
	cmake --build --preset $(PRESET) -j $(JOBS)

study: build
	./$(BUILD_DIR)/tools/keysel study

test: build
	ctest --preset $(PRESET)

pytest: configure
	cmake --build --preset $(PRESET) -j $(JOBS) --target keysel_python
	PYTHONPATH=$(BUILD_DIR)/python .venv/bin/python -m pytest -q tests/python

asan:
	$(MAKE) test PRESET=asan

clean:
	rm -rf build build-asan build-cpu
