// Seeded synthetic attention workloads with the structure real decoders show.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "keysel/core/attention_inputs.h"

namespace keysel {

struct SyntheticOptions {
  std::int64_t keys = 8192;        // N
  std::int64_t tokens = 16;        // T query tokens, at the last T positions (decode of T consecutive tokens)
  std::int64_t query_heads = 32;   // Hq
  std::int64_t kv_heads = 8;       // Hkv
  std::int64_t head_dim = 128;     // D
  std::int64_t value_dim = 128;    // Dv
  std::uint64_t seed = 1;
  double sink_strength = 4.0;      // extra logit mass on position 0 (attention sink); 0 for none
  double recency = 1.0;            // strength of the bias toward recent keys; 0 for none
  double focus = 1.0;              // how peaked attention is on a few relevant keys; 0 gives diffuse attention
};

/// q, k, v in fp32 with their positions, owned.
struct Workload {
  std::string name;
  AttentionShape shape;
  std::vector<float> q;                 // [T, Hq, D]
  std::vector<float> k;                 // [N, Hkv, D]
  std::vector<float> v;                 // [N, Hkv, Dv]
  std::vector<std::int32_t> positions;  // [T]
  double scale = 0.0;                   // softmax scale for inputs(); 0 means 1/sqrt(D)

  /// Views over the owned data (valid while the workload lives and is not resized).
  AttentionInputs inputs() const;
};

/// Generates a workload; the same options give the same bits. Throws keysel::Error on bad options.
Workload make_synthetic_workload(const SyntheticOptions& options);

}  // namespace keysel
