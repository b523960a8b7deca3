// keysel::dump_from_safetensors(parse_safetensors(bytes)) (recall/include/keysel/recall/dump.h): the in-memory form
// of load_dump. Every layer of an accepted dump becomes a workload, and small ones are run through the exact
// reference, its top-k and the metrics, as `keysel study` does with a dump.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_support.h"
#include "keysel/core/selection.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/metrics.h"

using keysel::fuzz::finding;

namespace {

/// Scores computed by the reference stay small (work and memory grow with T * Hq * N * D).
constexpr std::int64_t kMaxReferenceWork = std::int64_t{1} << 20;

void run_reference(const keysel::Workload& w) {
  const keysel::AttentionShape& s = w.shape;
  const std::int64_t dims = s.head_dim + s.value_dim;
  if (s.tokens <= 0 || s.keys <= 0 || s.query_heads <= 0 || dims <= 0) return;
  if (s.tokens * s.query_heads > kMaxReferenceWork / s.keys / dims) return;
  const keysel::ExactReference reference(w.inputs(), keysel::Granularity::per_kv_head);
  keysel::SelectionPolicy policy;
  policy.k = 4;
  policy.n_sink = 1;
  std::vector<std::int32_t> selection(static_cast<std::size_t>(s.tokens * reference.groups() * policy.width()));
  const keysel::TensorView view(selection.data(), keysel::DType::int32,
                                {s.tokens, reference.groups(), policy.width()});
  reference.exact_topk(policy, view);
  const auto metrics = reference.evaluate(view, policy.k);
  if (static_cast<std::int64_t>(metrics.size()) != s.tokens * reference.groups()) finding("metrics row count");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keysel::fuzz::single_threaded();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  keysel::fuzz::fuzz_one([&] {
    keysel::SafetensorsFile file = keysel::parse_safetensors(keysel::fuzz::bytes_of(data, size), "<fuzz dump>");
    const keysel::Dump dump = keysel::dump_from_safetensors(std::move(file), "<fuzz dump>");
    for (std::size_t i = 0; i < dump.layers.size(); ++i) {
      (void)dump.layer(dump.layers[i].index);
      const keysel::Workload w = dump.workload(i);
      try {
        run_reference(w);
      } catch (const keysel::Error&) {
        // Values the reference refuses (non-finite inputs, ...): next layer.
      }
    }
  });
  return 0;
}
