#!/usr/bin/env bash
# Installs the Debian packages keysel builds with, skipping those already present.
# Runs apt-get as root, or through sudo when it is available.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libgomp1 libomp-dev  # libomp-dev also brings Archer (libarcher.so), which the tsan preset relies on
  libgtest-dev libgmock-dev libbenchmark-dev
  libboost-program-options-dev
  nlohmann-json3-dev
  libfaiss-dev libopenblas-dev
  libhwy-dev
  clang libclang-rt-14-dev  # the fuzz and tsan presets: clang, libFuzzer and the sanitizer runtimes
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

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
