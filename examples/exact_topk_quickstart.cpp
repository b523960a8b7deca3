// keysel quickstart: pick the exact top-k keys of a decode step, run attention over them, and measure how much
// of full attention the selection keeps.
//
//   cmake -S examples -B build-examples -DCMAKE_PREFIX_PATH=<keysel install prefix>
//   cmake --build build-examples && ./build-examples/exact_topk_quickstart
#include <cmath>
#include <cstdio>
#include <vector>

#include <keysel/keysel.h>

int main() {
  // A seeded synthetic cache: N = 4096 keys, 4 decode tokens, GQA with 16 query and 4 key/value heads.
  keysel::SyntheticOptions options;
  options.keys = 4096;
  options.tokens = 4;
  options.query_heads = 16;
  options.kv_heads = 4;
  options.head_dim = 64;
  options.value_dim = 64;
  const keysel::Workload workload = keysel::make_synthetic_workload(options);
  const keysel::AttentionInputs inputs = workload.inputs();
  const keysel::AttentionShape& shape = workload.shape;

  // Select k = 256 keys per token and key head, always keeping 4 sink tokens and the 64 most recent ones.
  keysel::SelectionPolicy policy;
  policy.k = 256;
  policy.granularity = keysel::Granularity::per_kv_head;
  policy.n_sink = 4;
  policy.n_local = 64;
  const std::int64_t groups = keysel::group_count(policy.granularity, shape.query_heads, shape.kv_heads);
  std::vector<std::int32_t> selection(static_cast<std::size_t>(shape.tokens * groups * policy.width()));
  keysel::TensorView selection_view(selection.data(), keysel::DType::int32,
                                    {shape.tokens, groups, policy.width()});
  keysel::exact_topk(inputs, policy, selection_view);

  // Attention over the selection beside full attention.
  std::vector<float> sparse(static_cast<std::size_t>(shape.tokens * shape.query_heads * shape.value_dim));
  std::vector<float> full(sparse.size());
  keysel::TensorView sparse_view(sparse.data(), keysel::DType::fp32,
                                 {shape.tokens, shape.query_heads, shape.value_dim});
  keysel::TensorView full_view(full.data(), keysel::DType::fp32, {shape.tokens, shape.query_heads, shape.value_dim});
  keysel::sparse_attention_reference(inputs, selection_view, policy.granularity, sparse_view);
  keysel::full_attention(inputs, full_view);
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    diff += (sparse[i] - full[i]) * (sparse[i] - full[i]);
    norm += full[i] * full[i];
  }

  // Fidelity of the selection (SPEC §4), aggregated over tokens and groups.
  const keysel::ExactReference reference(inputs, policy.granularity);
  const auto rows = reference.evaluate(selection_view, policy.k);
  std::vector<double> mass, recall;
  for (const auto& m : rows) {
    mass.push_back(m.mass);
    recall.push_back(m.recall);
  }
  std::printf("k = %lld of N = %lld keys: recall %.3f, attention mass kept %.3f (min %.3f), "
              "relative output error %.2e\n",
              static_cast<long long>(policy.k), static_cast<long long>(shape.keys),
              keysel::aggregate(recall).mean, keysel::aggregate(mass).mean, keysel::aggregate(mass).min,
              std::sqrt(diff / norm));
  return 0;
}
