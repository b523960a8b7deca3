// Seeded synthetic decode workloads.
//
// The generative model, per key/value head (scale = 1/sqrt(D), logits = scale * q.k):
//   keys    k[s] = a_s * noise_s + c * w[s] (+ a sink component for s = 0), where noise_s ~ N(0, I), a_s is a
//           log-normal per-key norm, and w[s] is a slowly drifting AR(1) random walk (unit variance per
//           channel, correlation exp(-distance / kDriftLength)) shared by the keys and queries of the head.
//   queries q[t,h] = noise + (mean direction u of the key head) + c * w[pos(t)] + focus terms,
// with c = sqrt(recency * kRecencyLogit / sqrt(D)), the same in keys and queries.
// This gives each logit four parts: a background of spread ~1 that every key gets (diffuse attention);
// (a) a sink: key 0 carries a component along u, the mean query direction of its head, worth about
//     sink_strength * kSinkLogit of logit for every query of that head, so position 0 absorbs much of the mass;
// (b) recency: the shared walk adds about recency * kRecencyLogit * exp(-distance / kDriftLength), so nearby
//     keys score higher;
// (c) focus: each query head adds multiples k_j / |k_j|^2 of a handful of "relevant" earlier keys j to its
//     query, which raises their logits by about focus * kFocusLogit (jittered per head and token). The heads of
//     one key head share part of their relevant keys (a per-group pool) and pick the rest on their own; each
//     token adds a few relevant keys of its own.
// Values are a per-head mean plus N(0, I) noise. With the defaults (N = 8192, D = 128, GQA 32/8) the mean
// entropy of a group's attention is about 0.58 log N, the exact top-64 holds about 60% of the mass (the sink
// about 25% of it), and the sink plus the 60 most recent keys hold about 34%: which keys a selector picks
// matters, and the baselines differ.
//
// Every random number comes from RandomStream(seed, stream) with one stream per key head (keys, values, group
// pool) and per query head (queries), so the workload does not depend on the thread count.
#include "keysel/recall/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

// Shape of the model (logit units; see the comment above).
constexpr double kKeyNormSpread = 0.15;   // stddev of log a_s
constexpr double kQueryMean = 0.5;        // |mean query direction component| / sqrt(D)
constexpr double kSinkLogit = 2.3;        // sink logit per unit of sink_strength
constexpr double kDriftLength = 48.0;     // tokens over which the recency walk decorrelates by 1/e
constexpr double kRecencyLogit = 5.5;     // logit bonus of the key at the query's own position, per unit recency
constexpr double kFocusLogit = 5.0;       // mean logit bonus of a relevant key, per unit focus
constexpr double kFocusJitter = 1.5;      // stddev of that bonus across relevant keys and tokens
constexpr double kHeadFocusSpread = 0.25; // stddev of log of a head's focus multiplier
constexpr std::int64_t kSharedRelevant = 4;  // relevant keys shared by the heads of one key head
constexpr std::int64_t kOwnRelevant = 4;     // relevant keys of each query head alone
constexpr std::int64_t kTokenRelevant = 2;   // relevant keys of each (token, head) alone
constexpr double kValueMean = 0.5;        // stddev of the per-head mean of the values

// Stream ids: one family per role, the head index in the low bits.
constexpr std::uint64_t kKeyStream = 1ull << 40;
constexpr std::uint64_t kValueStream = 2ull << 40;
constexpr std::uint64_t kGroupStream = 3ull << 40;
constexpr std::uint64_t kQueryStream = 4ull << 40;

/// A uniformly random unit vector of `dim` channels.
std::vector<double> random_unit_vector(RandomStream& random, std::int64_t dim) {
  std::vector<double> u(static_cast<std::size_t>(dim));
  double norm2 = 0;
  do {
    random.fill_normal(std::span<double>(u));
    norm2 = 0;
    for (const double x : u) norm2 += x * x;
  } while (norm2 == 0);
  const double inv = 1.0 / std::sqrt(norm2);
  for (double& x : u) x *= inv;
  return u;
}

/// `count` distinct positions drawn uniformly from [first, last] (fewer when the range is smaller).
std::vector<std::int64_t> distinct_positions(RandomStream& random, std::int64_t first, std::int64_t last,
                                             std::int64_t count) {
  std::vector<std::int64_t> out;
  if (last < first) return out;
  const std::int64_t range = last - first + 1;
  count = std::min(count, range);
  while (static_cast<std::int64_t>(out.size()) < count) {
    const std::int64_t s = first + static_cast<std::int64_t>(random.uniform_int(static_cast<std::uint64_t>(range)));
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  return out;
}

}  // namespace

AttentionInputs Workload::inputs() const {
  const auto expect_size = [](std::size_t size, std::int64_t expected, const char* name) {
    if (static_cast<std::int64_t>(size) != expected) {
      detail::throw_argument_error("Workload::inputs", name, std::to_string(expected) + " elements (from shape)",
                                   std::to_string(size));
    }
  };
  expect_size(q.size(), shape.tokens * shape.query_heads * shape.head_dim, "q");
  expect_size(k.size(), shape.keys * shape.kv_heads * shape.head_dim, "k");
  expect_size(v.size(), shape.keys * shape.kv_heads * shape.value_dim, "v");
  expect_size(positions.size(), shape.tokens, "positions");
  AttentionInputs in;
  in.q = TensorView(q.data(), DType::fp32, {shape.tokens, shape.query_heads, shape.head_dim});
  in.k = TensorView(k.data(), DType::fp32, {shape.keys, shape.kv_heads, shape.head_dim});
  if (shape.value_dim > 0) in.v = TensorView(v.data(), DType::fp32, {shape.keys, shape.kv_heads, shape.value_dim});
  in.positions = TensorView(positions.data(), DType::int32, {shape.tokens});
  in.scale = scale;
  return in;
}

Workload make_synthetic_workload(const SyntheticOptions& options) {
  {
    const SyntheticOptions& o = options;
    KEYSEL_CHECK_ARG(o.keys >= 1 && o.keys <= std::numeric_limits<std::int32_t>::max(), "options.keys",
                     "1 <= keys <= 2^31 - 1", o.keys);
    KEYSEL_CHECK_ARG(o.tokens >= 1, "options.tokens", ">= 1", o.tokens);
    KEYSEL_CHECK_ARG(o.tokens <= o.keys, "options.tokens", "<= keys = " + std::to_string(o.keys), o.tokens);
    KEYSEL_CHECK_ARG(o.query_heads >= 1, "options.query_heads", ">= 1", o.query_heads);
    KEYSEL_CHECK_ARG(o.kv_heads >= 1, "options.kv_heads", ">= 1", o.kv_heads);
    KEYSEL_CHECK_ARG(o.query_heads % o.kv_heads == 0, "options.kv_heads",
                     "a divisor of query_heads = " + std::to_string(o.query_heads), o.kv_heads);
    KEYSEL_CHECK_ARG(o.head_dim >= 1, "options.head_dim", ">= 1", o.head_dim);
    KEYSEL_CHECK_ARG(o.value_dim >= 1, "options.value_dim", ">= 1", o.value_dim);
    KEYSEL_CHECK_ARG(std::isfinite(o.sink_strength) && o.sink_strength >= 0, "options.sink_strength",
                     "a finite value >= 0", o.sink_strength);
    KEYSEL_CHECK_ARG(std::isfinite(o.recency) && o.recency >= 0, "options.recency", "a finite value >= 0",
                     o.recency);
    KEYSEL_CHECK_ARG(std::isfinite(o.focus) && o.focus >= 0, "options.focus", "a finite value >= 0", o.focus);
    // Sizes of the owned buffers must fit in memory arithmetic.
    const double elements = static_cast<double>(o.keys) * static_cast<double>(o.kv_heads) *
                            static_cast<double>(std::max(o.head_dim, o.value_dim));
    KEYSEL_CHECK_ARG(elements < 4e9, "options", "keys * kv_heads * max(head_dim, value_dim) < 4e9 elements",
                     elements);
  }
  const std::int64_t N = options.keys, T = options.tokens, Hq = options.query_heads, Hkv = options.kv_heads;
  const std::int64_t D = options.head_dim, Dv = options.value_dim, g = Hq / Hkv;
  const double sqrt_d = std::sqrt(static_cast<double>(D));
  const double scale = 1.0 / sqrt_d;

  Workload w;
  {
    std::ostringstream name;
    name << "synthetic(seed=" << options.seed << ", sink_strength=" << options.sink_strength
         << ", recency=" << options.recency << ", focus=" << options.focus << ")";
    w.name = name.str();
  }
  w.shape = {T, N, Hq, Hkv, D, Dv};
  w.q.assign(static_cast<std::size_t>(T * Hq * D), 0.0f);
  w.k.assign(static_cast<std::size_t>(N * Hkv * D), 0.0f);
  w.v.assign(static_cast<std::size_t>(N * Hkv * Dv), 0.0f);
  w.positions.resize(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) w.positions[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(N - T + t);

  // Per key head: the mean query direction u and the recency walk w[s] (kept for the queries).
  std::vector<double> mean_direction(static_cast<std::size_t>(Hkv * D));
  std::vector<double> walk(static_cast<std::size_t>(Hkv * T * D));  // [Hkv, T, D]: w at the query positions
  const double rho = std::exp(-1.0 / kDriftLength);
  const double innovation = std::sqrt(1.0 - rho * rho);
  const double query_mean = kQueryMean * sqrt_d;
  // scale * (c w[s]) . (c w[pos]) ~ c^2 sqrt(D) exp(-distance / kDriftLength) = recency * kRecencyLogit * ...
  const double walk_amplitude = std::sqrt(options.recency * kRecencyLogit / sqrt_d);

  // Keys and values, one key head per work item.
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t kh = 0; kh < Hkv; ++kh) {
    RandomStream random(options.seed, kKeyStream + static_cast<std::uint64_t>(kh));
    const std::vector<double> u = random_unit_vector(random, D);
    std::copy(u.begin(), u.end(), mean_direction.begin() + kh * D);
    std::vector<double> ws(static_cast<std::size_t>(D));
    std::vector<double> noise(static_cast<std::size_t>(D));
    for (std::int64_t s = 0; s < N; ++s) {
      for (double& x : ws) x = s == 0 ? random.normal() : rho * x + innovation * random.normal();
      if (s >= N - T) std::copy(ws.begin(), ws.end(), walk.begin() + (kh * T + s - (N - T)) * D);
      const double key_norm = std::exp(kKeyNormSpread * random.normal());
      random.fill_normal(std::span<double>(noise));
      float* key = w.k.data() + (s * Hkv + kh) * D;
      for (std::int64_t d = 0; d < D; ++d) {
        const auto i = static_cast<std::size_t>(d);
        key[d] = static_cast<float>(key_norm * noise[i] + walk_amplitude * ws[i]);
      }
    }
    // The sink: scale * (query_mean u) . (beta u) = sink_strength * kSinkLogit.
    const double beta = options.sink_strength * kSinkLogit / (scale * query_mean);
    for (std::int64_t d = 0; d < D; ++d) w.k[static_cast<std::size_t>(kh * D + d)] += static_cast<float>(beta * u[d]);

    RandomStream value_random(options.seed, kValueStream + static_cast<std::uint64_t>(kh));
    std::vector<double> value_mean(static_cast<std::size_t>(Dv));
    value_random.fill_normal(std::span<double>(value_mean), 0.0, kValueMean);
    for (std::int64_t s = 0; s < N; ++s) {
      float* value = w.v.data() + (s * Hkv + kh) * Dv;
      for (std::int64_t d = 0; d < Dv; ++d) {
        value[d] = static_cast<float>(value_mean[static_cast<std::size_t>(d)] + value_random.normal());
      }
    }
  }

  // Relevant keys may be read by every query token: positions 1 .. N-T (0 is the sink).
  const std::int64_t first_relevant = 1, last_relevant = N - T;
  std::vector<std::vector<std::int64_t>> group_pool(static_cast<std::size_t>(Hkv));
  for (std::int64_t kh = 0; kh < Hkv; ++kh) {
    RandomStream random(options.seed, kGroupStream + static_cast<std::uint64_t>(kh));
    group_pool[static_cast<std::size_t>(kh)] = distinct_positions(random, first_relevant, last_relevant, kSharedRelevant);
  }

  // Queries, one query head per work item.
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t kh = h / g;
    RandomStream random(options.seed, kQueryStream + static_cast<std::uint64_t>(h));
    const double head_focus = options.focus * std::exp(kHeadFocusSpread * random.normal());
    std::vector<std::int64_t> relevant = group_pool[static_cast<std::size_t>(kh)];
    for (const std::int64_t s : distinct_positions(random, first_relevant, last_relevant, kOwnRelevant)) {
      if (std::find(relevant.begin(), relevant.end(), s) == relevant.end()) relevant.push_back(s);
    }
    const double* u = mean_direction.data() + kh * D;
    std::vector<double> query(static_cast<std::size_t>(D));
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t pos = N - T + t;
      random.fill_normal(std::span<double>(query));
      const double* wp = walk.data() + (kh * T + t) * D;
      for (std::int64_t d = 0; d < D; ++d) query[static_cast<std::size_t>(d)] += query_mean * u[d] + walk_amplitude * wp[d];

      std::vector<std::int64_t> focus_keys = relevant;
      for (const std::int64_t s : distinct_positions(random, first_relevant, pos, kTokenRelevant)) {
        if (std::find(focus_keys.begin(), focus_keys.end(), s) == focus_keys.end()) focus_keys.push_back(s);
      }
      for (const std::int64_t s : focus_keys) {
        // Adding (bonus / scale) * k_s / |k_s|^2 raises this query's logit of key s by `bonus`.
        const double bonus = head_focus * std::max(0.0, kFocusLogit + kFocusJitter * random.normal());
        const float* key = w.k.data() + (s * Hkv + kh) * D;
        double norm2 = 0;
        for (std::int64_t d = 0; d < D; ++d) norm2 += static_cast<double>(key[d]) * key[d];
        if (norm2 == 0) continue;
        const double c = bonus / (scale * norm2);
        for (std::int64_t d = 0; d < D; ++d) query[static_cast<std::size_t>(d)] += c * key[d];
      }
      float* out = w.q.data() + (t * Hq + h) * D;
      for (std::int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(query[static_cast<std::size_t>(d)]);
    }
  }
  return w;
}

}  // namespace keysel
