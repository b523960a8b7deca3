#!/usr/bin/env bash
# Installs the Debian packages keysel builds with, skipping those already present, then the Python packages
# of python/requirements.txt into the virtual environment .venv/ at the repository root (skipped when the
# requirements file has not changed since the last install). KEYSEL_NO_PYTHON=1 skips both the Python packages of
# .venv and the Debian ones only the Python tests use (python3-torch, python3-numpy, python3-pytest).
# Runs apt-get as root, or through sudo when it is available.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

packages=(
  build-essential cmake ninja-build pkg-config
  libgomp1 libomp-dev  # libomp-dev also brings Archer (libarcher.so), which the tsan preset relies on
  libgtest-dev libgmock-dev libbenchmark-dev
  libboost-program-options-dev
  nlohmann-json3-dev
  libfaiss-dev libopenblas-dev
  libhwy-dev
  clang libclang-rt-14-dev  # the fuzz and tsan presets: clang, libFuzzer and the sanitizer runtimes
  python3 python3-dev python3-venv
)
if [ "${KEYSEL_NO_PYTHON:-0}" != 1 ]; then
  # ctest's python.pytest_oldest_torch: tests/python under the system Python with Debian 12's torch 1.13 (CPU),
  # the oldest torch keysel supports (python/CMakeLists.txt). Without recommends, on a machine that has the
  # packages above: 182 packages, 141 MB to download, 608 MiB installed (about a minute; PyPI's torch is ~3 GB).
  packages+=(python3-torch python3-numpy python3-pytest)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "install-deps: missing ${missing[*]}; run as root or install sudo" >&2
      exit 1
    fi
  fi

  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
    # Package lists may be missing or stale on a fresh machine.
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
  fi
fi

# ---- Python: .venv/ with the exact pins of python/requirements.txt ----------------------------------------
if [ "${KEYSEL_NO_PYTHON:-0}" = 1 ]; then
  exit 0
fi
venv="$root/.venv"
requirements="$root/python/requirements.txt"
stamp="$venv/.keysel-requirements.sha256"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "install-deps: .venv has python/requirements.txt"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "install-deps: creating .venv"
  python3 -m venv "$venv"
fi
echo "install-deps: installing python/requirements.txt into .venv (torch brings about 3 GB of CUDA wheels)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
echo "$wanted" > "$stamp"
