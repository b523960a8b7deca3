#!/usr/bin/env bash
# Builds the `fuzz` preset (clang, libFuzzer, ASan + UBSan) and runs every harness for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_HARNESS] [HARNESS...]     default: 60 s each, all five harnesses
#
# Corpora live in build-fuzz/corpus/<harness> (kept between runs, so later runs start where earlier ones
# stopped); each run first copies the seeds into them: fuzz/seeds/<harness without fuzz_>, tests/data (safetensors, npy and
# dump files) and examples/studies. Crash, leak and timeout inputs go to build-fuzz/artifacts/, logs to
# build-fuzz/logs/. Exits 1 when any harness found something, naming the input that reproduces it:
#   build-fuzz/fuzz/<harness> <input>                                    reproduce
#   build-fuzz/fuzz/<harness> -minimize_crash=1 -runs=10000 <input>      minimise
# Environment: KEYSEL_FUZZ_JOBS (build jobs, default nproc), KEYSEL_FUZZ_NO_BUILD=1 (use the existing build),
# KEYSEL_FUZZ_ARGS (extra libFuzzer flags, e.g. "-jobs=4 -workers=4"). docs/reliability.md has more.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all=(fuzz_safetensors fuzz_npy fuzz_dump fuzz_study_config fuzz_selector_spec)
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=("${all[@]}")

build=build-fuzz
if [ "${KEYSEL_FUZZ_NO_BUILD:-0}" != 1 ]; then
  cmake --preset fuzz >/dev/null
  cmake --build --preset fuzz -j "${KEYSEL_FUZZ_JOBS:-$(nproc)}" --target "${harnesses[@]}"
fi

# Per harness: the longest input, and the seed files (besides fuzz/seeds/<harness without fuzz_>).
declare -A max_len=([fuzz_safetensors]=81920 [fuzz_npy]=4096 [fuzz_dump]=81920 [fuzz_study_config]=16384
                    [fuzz_selector_spec]=4096)
declare -A dict=([fuzz_safetensors]=safetensors [fuzz_npy]=npy [fuzz_dump]=safetensors
                 [fuzz_study_config]=study_config [fuzz_selector_spec]=selector_spec)
seed_files() {
  case "$1" in
    fuzz_safetensors) ls tests/data/*.safetensors tests/data/reference/*.safetensors ;;
    fuzz_dump) ls tests/data/*.safetensors ;;
    fuzz_npy) ls tests/data/reference/*.npy ;;
    fuzz_study_config) ls examples/studies/*.json ;;
    fuzz_selector_spec) ;;
  esac
}

# Sanitizer reports end the run (UBSan included); leaks count as findings.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export OMP_NUM_THREADS=1

mkdir -p "$build/artifacts" "$build/logs"
failed=()
for h in "${harnesses[@]}"; do
  [ -n "${max_len[$h]:-}" ] || { echo "fuzz/run.sh: unknown harness $h (one of ${all[*]})" >&2; exit 2; }
  corpus="$build/corpus/$h"
  mkdir -p "$corpus"
  for f in fuzz/seeds/"${h#fuzz_}"/* $(seed_files "$h"); do
    [ -f "$f" ] && cp -n "$f" "$corpus/seed-$(basename "$f")"
  done
  log="$build/logs/$h.log"
  echo "== $h: ${seconds} s, corpus $corpus ($(ls "$corpus" | wc -l) inputs)"
  set +e
  # shellcheck disable=SC2086
  "$build/fuzz/$h" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -max_len="${max_len[$h]}" -timeout=30 -dict="fuzz/dicts/${dict[$h]}.dict" \
    -artifact_prefix="$build/artifacts/$h-" -print_final_stats=1 ${KEYSEL_FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)" "$log" | tail -2 || true
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "$log" || true
  if [ $rc -ne 0 ]; then
    crash=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | sed 's/Test unit written to //')
    echo "!! $h FAILED (exit $rc): reproducer ${crash:-<none written>}; log $log"
    grep -m1 -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error|terminate called|keysel fuzz finding|.*ERROR: libFuzzer)' "$log" || true
    grep -E '^ +#[0-9]+ ' "$log" | grep -v -E 'libFuzzer|fuzzer::|__sanitizer|__asan|__ubsan|libc\.so|abort|raise' | head -6 || true
    failed+=("$h:${crash:-none}")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: findings in ${#failed[@]} harness(es):"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "fuzz/run.sh: ${#harnesses[@]} harness(es), ${seconds} s each, no findings"
