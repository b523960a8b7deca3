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
//
// Realism knobs (all off by default; off, the workload is bit-identical to the one generated before they existed):
//   rope_base > 0    the key's background-plus-recency part is rotated by R(s) and the query's by R(pos) (RoPE,
//                    rotate-half pairs (i, i + D/2), angle pos * base^(-2i/D)); the sink direction, the key-0 sink
//                    and the focus terms (computed against the rotated keys) are added after the rotation, as
//                    models learn to keep them position-independent. The recency bonus becomes RoPE-shaped (fast
//                    channels decorrelate quickly with distance).
//   key_rank = r     the key's background and recency parts are B (sqrt(D/r) a_s z + (D/r) B^T c w[s]), B a random
//                    orthonormal D x r basis per key head and z the first r of the key's normals: keys of rank r
//                    (+1 for the sink) with the same expected recency logits; the recency part's norm grows by
//                    sqrt(D/r), which widens the background logits (measure_workload shows the effect).
//   key_shift        every key of a head gets + key_shift sqrt(D) b (b a random unit vector): each logit of one
//                    query moves by the same q.b, so attention is unchanged, but keys drift away from queries.
//   outlier_channels / outlier_scale   a few random channels per key head are multiplied by outlier_scale in
//                    the keys and divided by it in the queries: logits are unchanged, key magnitudes are not
//                    (what per-token quantisation scales must cope with).
//   temperature      queries are divided by it at the end: logits / temperature, the attention-entropy knob.
// measure_workload() reports the entropy and top-k mass a setting gives.
#include "keysel/recall/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <sstream>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/attention/reference.h"

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
constexpr std::uint64_t kRealismStream = 5ull << 40;  // low-rank basis, shift direction, outlier channels

/// Rotates `x` (D channels) as RoPE does at position `pos`: pairs (i, i + D/2) by pos * inv_freq[i].
void apply_rope(std::span<double> x, std::int64_t pos, const std::vector<double>& inv_freq) {
  const std::size_t half = inv_freq.size();
  for (std::size_t i = 0; i < half; ++i) {
    const double angle = static_cast<double>(pos) * inv_freq[i];
    const double c = std::cos(angle), s = std::sin(angle);
    const double a = x[i], b = x[i + half];
    x[i] = a * c - b * s;
    x[i + half] = b * c + a * s;
  }
}

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

SelectionRequest Workload::request() const {
  SelectionRequest request = SelectionRequest::of(inputs());
  if (index_heads > 0) {
    request.indexer_queries = TensorView(index_q.data(), DType::fp32, {shape.tokens, index_heads, index_dim});
    request.indexer_weights = TensorView(index_w.data(), DType::fp32, {shape.tokens, index_heads});
  }
  return request;
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
    KEYSEL_CHECK_ARG(std::isfinite(o.rope_base) && o.rope_base >= 0, "options.rope_base", "a finite value >= 0",
                     o.rope_base);
    KEYSEL_CHECK_ARG(o.outlier_channels >= 0 && o.outlier_channels <= o.head_dim, "options.outlier_channels",
                     "0 <= outlier_channels <= head_dim = " + std::to_string(o.head_dim), o.outlier_channels);
    KEYSEL_CHECK_ARG(std::isfinite(o.outlier_scale) && o.outlier_scale > 0, "options.outlier_scale",
                     "a finite value > 0", o.outlier_scale);
    KEYSEL_CHECK_ARG(o.key_rank >= 0 && o.key_rank <= o.head_dim, "options.key_rank",
                     "0 (full rank) <= key_rank <= head_dim = " + std::to_string(o.head_dim), o.key_rank);
    KEYSEL_CHECK_ARG(std::isfinite(o.key_shift) && o.key_shift >= 0, "options.key_shift", "a finite value >= 0",
                     o.key_shift);
    KEYSEL_CHECK_ARG(std::isfinite(o.temperature) && o.temperature > 0, "options.temperature", "a finite value > 0",
                     o.temperature);
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
         << ", recency=" << options.recency << ", focus=" << options.focus;
    if (options.rope_base > 0) name << ", rope_base=" << options.rope_base;
    if (options.outlier_channels > 0 && options.outlier_scale != 1.0) {
      name << ", outliers=" << options.outlier_channels << "x" << options.outlier_scale;
    }
    if (options.key_rank > 0) name << ", key_rank=" << options.key_rank;
    if (options.key_shift > 0) name << ", key_shift=" << options.key_shift;
    if (options.temperature != 1.0) name << ", temperature=" << options.temperature;
    name << ")";
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

  // Realism knobs: per key head, a low-rank basis [D, r] and a shift direction, from their own streams.
  const bool rope = options.rope_base > 0;
  const std::int64_t rank = options.key_rank;
  std::vector<double> inv_freq;
  if (rope) {
    for (std::int64_t i = 0; i < D / 2; ++i) {
      inv_freq.push_back(std::pow(options.rope_base, -2.0 * static_cast<double>(i) / static_cast<double>(D)));
    }
  }
  std::vector<double> basis(static_cast<std::size_t>(rank > 0 ? Hkv * D * rank : 0));  // [Hkv, D, r]
  std::vector<double> shift_direction(static_cast<std::size_t>(options.key_shift > 0 ? Hkv * D : 0));
  std::vector<std::vector<std::int64_t>> outliers(static_cast<std::size_t>(Hkv));
  for (std::int64_t kh = 0; kh < Hkv; ++kh) {
    RandomStream random(options.seed, kRealismStream + static_cast<std::uint64_t>(kh));
    if (rank > 0) {
      // Modified Gram-Schmidt on random normal columns.
      double* b = basis.data() + kh * D * rank;
      for (std::int64_t j = 0; j < rank; ++j) {
        double norm2 = 0;
        do {
          for (std::int64_t d = 0; d < D; ++d) b[d * rank + j] = random.normal();
          for (std::int64_t i = 0; i < j; ++i) {
            double dot = 0;
            for (std::int64_t d = 0; d < D; ++d) dot += b[d * rank + i] * b[d * rank + j];
            for (std::int64_t d = 0; d < D; ++d) b[d * rank + j] -= dot * b[d * rank + i];
          }
          norm2 = 0;
          for (std::int64_t d = 0; d < D; ++d) norm2 += b[d * rank + j] * b[d * rank + j];
        } while (norm2 < 1e-12);
        const double inv = 1.0 / std::sqrt(norm2);
        for (std::int64_t d = 0; d < D; ++d) b[d * rank + j] *= inv;
      }
    }
    if (options.key_shift > 0) {
      const std::vector<double> b = random_unit_vector(random, D);
      std::copy(b.begin(), b.end(), shift_direction.begin() + kh * D);
    }
    if (options.outlier_channels > 0) {
      outliers[static_cast<std::size_t>(kh)] = distinct_positions(random, 0, D - 1, options.outlier_channels);
    }
  }

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
      if (!rope && rank == 0) {
        for (std::int64_t d = 0; d < D; ++d) {
          const auto i = static_cast<std::size_t>(d);
          key[d] = static_cast<float>(key_norm * noise[i] + walk_amplitude * ws[i]);
        }
        continue;
      }
      std::vector<double> content(static_cast<std::size_t>(D));
      if (rank > 0) {
        // B (sqrt(D/r) a_s z + (D/r) B^T c w): the first r normals are z.
        const double* b = basis.data() + kh * D * rank;
        std::vector<double> coefficient(static_cast<std::size_t>(rank));
        const double noise_gain = std::sqrt(static_cast<double>(D) / static_cast<double>(rank));
        const double walk_gain = static_cast<double>(D) / static_cast<double>(rank);
        for (std::int64_t j = 0; j < rank; ++j) {
          double projection = 0;
          for (std::int64_t d = 0; d < D; ++d) projection += b[d * rank + j] * ws[static_cast<std::size_t>(d)];
          coefficient[static_cast<std::size_t>(j)] = noise_gain * key_norm * noise[static_cast<std::size_t>(j)] +
                                                     walk_gain * walk_amplitude * projection;
        }
        for (std::int64_t d = 0; d < D; ++d) {
          double x = 0;
          for (std::int64_t j = 0; j < rank; ++j) x += b[d * rank + j] * coefficient[static_cast<std::size_t>(j)];
          content[static_cast<std::size_t>(d)] = x;
        }
      } else {
        for (std::int64_t d = 0; d < D; ++d) {
          const auto i = static_cast<std::size_t>(d);
          content[i] = key_norm * noise[i] + walk_amplitude * ws[i];
        }
      }
      if (rope) apply_rope(content, s, inv_freq);
      for (std::int64_t d = 0; d < D; ++d) key[d] = static_cast<float>(content[static_cast<std::size_t>(d)]);
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
      if (!rope) {
        for (std::int64_t d = 0; d < D; ++d) query[static_cast<std::size_t>(d)] += query_mean * u[d] + walk_amplitude * wp[d];
      } else {
        for (std::int64_t d = 0; d < D; ++d) query[static_cast<std::size_t>(d)] += walk_amplitude * wp[d];
        apply_rope(query, pos, inv_freq);
        for (std::int64_t d = 0; d < D; ++d) query[static_cast<std::size_t>(d)] += query_mean * u[d];
      }

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

  // Transformations that leave attention unchanged (shift, outliers) or scale every logit (temperature), applied
  // after the queries were built against the plain keys.
  const bool outlier = options.outlier_channels > 0 && options.outlier_scale != 1.0;
  if (options.key_shift > 0 || outlier) {
    const double shift = options.key_shift * sqrt_d;
    for (std::int64_t s = 0; s < N; ++s) {
      for (std::int64_t kh = 0; kh < Hkv; ++kh) {
        float* key = w.k.data() + (s * Hkv + kh) * D;
        if (options.key_shift > 0) {
          const double* b = shift_direction.data() + kh * D;
          for (std::int64_t d = 0; d < D; ++d) key[d] = static_cast<float>(key[d] + shift * b[d]);
        }
        if (outlier) {
          for (const std::int64_t c : outliers[static_cast<std::size_t>(kh)]) {
            key[c] = static_cast<float>(key[c] * options.outlier_scale);
          }
        }
      }
    }
  }
  if (outlier || options.temperature != 1.0) {
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t h = 0; h < Hq; ++h) {
        float* query = w.q.data() + (t * Hq + h) * D;
        if (outlier) {
          for (const std::int64_t c : outliers[static_cast<std::size_t>(h / g)]) {
            query[c] = static_cast<float>(query[c] / options.outlier_scale);
          }
        }
        if (options.temperature != 1.0) {
          for (std::int64_t d = 0; d < D; ++d) query[d] = static_cast<float>(query[d] / options.temperature);
        }
      }
    }
  }
  return w;
}

WorkloadProperties measure_workload(const Workload& workload, Granularity granularity,
                                    std::vector<std::int64_t> k_values) {
  const AttentionInputs inputs = workload.inputs();
  const AttentionShape shape = inputs.validate("measure_workload", false);
  for (const std::int64_t k : k_values) KEYSEL_CHECK_ARG(k >= 1, "k_values", "entries >= 1", k_values);
  const std::int64_t T = shape.tokens, N = shape.keys;
  const std::int64_t G = group_count(granularity, shape.query_heads, shape.kv_heads);
  KEYSEL_CHECK_ARG(static_cast<double>(T) * static_cast<double>(G) * static_cast<double>(N) <= 5e8, "workload",
                   "T * groups * N <= 5e8 (the probabilities are held in double)", workload.name);
  std::vector<double> pbar(static_cast<std::size_t>(T * G * N));
  group_probabilities(inputs, granularity, TensorView(pbar.data(), DType::fp64, {T, G, N}));

  WorkloadProperties p;
  p.granularity = granularity;
  p.k_values = k_values;
  p.topk_mass.assign(k_values.size(), 0.0);
  const std::int64_t k_max = k_values.empty() ? 0 : *std::max_element(k_values.begin(), k_values.end());
  std::vector<double> sorted;
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int64_t allowed = allowed_keys(workload.positions[static_cast<std::size_t>(t)], N);
    for (std::int64_t grp = 0; grp < G; ++grp) {
      const double* row = pbar.data() + (t * G + grp) * N;
      double entropy = 0;
      for (std::int64_t s = 0; s < allowed; ++s) {
        if (row[s] > 0) entropy -= row[s] * std::log(row[s]);
      }
      p.entropy += entropy;
      if (allowed > 1) p.entropy_normalized += entropy / std::log(static_cast<double>(allowed));
      p.sink_mass += row[0];
      sorted.assign(row, row + allowed);
      const std::int64_t top = std::min(k_max, allowed);
      std::partial_sort(sorted.begin(), sorted.begin() + top, sorted.end(), std::greater<>());
      for (std::size_t i = 0; i < k_values.size(); ++i) {
        const std::int64_t k = std::min(k_values[i], allowed);
        double mass = 0;
        for (std::int64_t j = 0; j < k; ++j) mass += sorted[static_cast<std::size_t>(j)];
        p.topk_mass[i] += mass;
      }
    }
  }
  const double rows = static_cast<double>(T * G);
  p.entropy /= rows;
  p.entropy_normalized /= rows;
  p.sink_mass /= rows;
  for (double& m : p.topk_mass) m /= rows;
  double k2 = 0, q2 = 0;
  for (const float x : workload.k) {
    k2 += static_cast<double>(x) * x;
    p.max_abs_key = std::max(p.max_abs_key, static_cast<double>(std::abs(x)));
  }
  for (const float x : workload.q) q2 += static_cast<double>(x) * x;
  p.key_norm = std::sqrt(k2 / static_cast<double>(N * shape.kv_heads));
  p.query_norm = std::sqrt(q2 / static_cast<double>(T * shape.query_heads));
  return p;
}

void print_workload_properties(const WorkloadProperties& p, std::ostream& out) {
  std::ostringstream text;
  text.setf(std::ios::fixed);
  text.precision(3);
  text << "attention (" << granularity_name(p.granularity) << " groups): entropy " << p.entropy << " nats ("
       << p.entropy_normalized << " of log|allowed|), sink mass " << p.sink_mass;
  for (std::size_t i = 0; i < p.k_values.size(); ++i) {
    text << ", top-" << p.k_values[i] << " mass " << p.topk_mass[i];
  }
  text.precision(2);
  text << "; rms |q| " << p.query_norm << ", rms |k| " << p.key_norm << ", max |k channel| " << p.max_abs_key;
  out << text.str() << '\n';
}

}  // namespace keysel
