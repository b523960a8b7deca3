# one-off: rebuild the Python module, run tests/python, then the C++ sanitizer stage
set -u
export OUT
bash bench/gpu/run.sh build python 2>&1 | tail -8
f=$(ls build-gpu/python/keysel/_C*.so); echo "exported std:: symbols: $(nm -D --defined-only $f | c++filt | grep -c 'std::')"
grep -E "passed|failed" $OUT/pytest.log | tail -3; grep -E "^FAILED|^ERROR" $OUT/pytest.log | head
timeout 330 bash bench/gpu/run.sh sanitize 2>&1 | tail -12
