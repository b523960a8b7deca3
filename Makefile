# Thin wrapper over the CMake presets. Each target installs missing Debian packages first.
#   make study   build, then run `keysel study` on the built-in default workload
#   make test    build, then run every test through ctest (the Python tests too: ctest's python.pytest)
#   make pytest  build the Python package only and run tests/python
#   make asan    the same tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make fuzz    build the libFuzzer harnesses (clang) and run each for FUZZ_SECONDS (docs/reliability.md)
#   make tsan    the multi-threaded tests under ThreadSanitizer (clang + libomp + Archer)
PRESET ?= default
JOBS ?= $(shell nproc)
export PATH := $(PATH):/usr/local/cuda/bin
BUILD_DIR = $(if $(filter default,$(PRESET)),build,build-$(PRESET))
FUZZ_SECONDS ?= 60

.PHONY: deps configure build study test pytest asan fuzz tsan clean

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

fuzz: deps
	KEYSEL_FUZZ_JOBS=$(JOBS) bash fuzz/run.sh $(FUZZ_SECONDS)

tsan:
	$(MAKE) test PRESET=tsan

clean:
	rm -rf build build-asan build-cpu build-fuzz build-tsan
