#include "keysel/attention/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace keysel {
namespace {

// The inputs decoded once into row-major doubles: every computation below reads these, so fp16/bf16 inputs
// cost one conversion and the arithmetic is double precision throughout.
struct DecodedInputs {
  AttentionShape shape;
  double scale = 0.0;
  std::vector<double> q;               // [T, Hq, D]
  std::vector<double> k;               // [N, Hkv, D]
  std::vector<double> v;               // [N, Hkv, Dv], empty when v is not given
  std::vector<std::int64_t> allowed;   // [T], min(pos(t) + 1, N)

  const double* query(std::int64_t t, std::int64_t h) const {
    return q.data() + (t * shape.query_heads + h) * shape.head_dim;
  }
  const double* key(std::int64_t s, std::int64_t kv) const {
    return k.data() + (s * shape.kv_heads + kv) * shape.head_dim;
  }
  const double* value(std::int64_t s, std::int64_t kv) const {
    return v.data() + (s * shape.kv_heads + kv) * shape.value_dim;
  }
};

DecodedInputs decode(const AttentionInputs& inputs, const AttentionShape& shape) {
  DecodedInputs in;
  in.shape = shape;
  in.scale = inputs.effective_scale();
  in.q = to_double_vector(inputs.q);
  in.k = to_double_vector(inputs.k);
  if (!inputs.v.empty()) in.v = to_double_vector(inputs.v);
  const std::vector<double> positions = to_double_vector(inputs.positions);
  in.allowed.resize(positions.size());
  for (std::size_t t = 0; t < positions.size(); ++t) {
    in.allowed[t] = allowed_keys(static_cast<std::int64_t>(positions[t]), shape.keys);
  }
  return in;
}

/// Checks an output argument completely; called for every output before anything is written.
void check_output(std::string_view function, const TensorView& view, std::string_view argument,
                  std::initializer_list<std::int64_t> shape, std::initializer_list<DType> dtypes) {
  expect_shape(function, view, argument, shape);
  expect_dtype(function, view, argument, dtypes);
  expect_device(function, view, argument, Device::cpu());
  expect_writable(function, view, argument);
}

/// Stores doubles into a checked fp32 or fp64 output, honouring its strides.
class OutputWriter {
 public:
  explicit OutputWriter(const TensorView& view)
      : data_(view.mutable_raw_data()), fp64_(view.dtype() == DType::fp64), rank_(view.rank()) {
    for (int d = 0; d < rank_; ++d) strides_[d] = view.stride(d);
  }
  void store(std::int64_t i, std::int64_t j, double value) const { store_at(i * strides_[0] + j * strides_[1], value); }
  void store(std::int64_t i, std::int64_t j, std::int64_t l, double value) const {
    store_at(i * strides_[0] + j * strides_[1] + l * strides_[2], value);
  }

 private:
  void store_at(std::int64_t offset, double value) const {
    if (fp64_) {
      static_cast<double*>(data_)[offset] = value;
    } else {
      static_cast<float*>(data_)[offset] = static_cast<float>(value);
    }
  }
  void* data_;
  bool fp64_;
  int rank_;
  std::int64_t strides_[TensorView::kMaxRank] = {};
};

/// exp(logit - max) of query (t, h) against each key in `keys`, into `weights`; returns the max logit and the
/// sum of the weights (the softmax denominator relative to the max). An empty key list gives max = -inf, sum 0.
struct Softmax {
  double max_logit = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  double log_sum_exp() const {
    return sum > 0.0 ? max_logit + std::log(sum) : -std::numeric_limits<double>::infinity();
  }
};

Softmax softmax_weights(const DecodedInputs& in, std::int64_t t, std::int64_t h,
                        std::span<const std::int64_t> keys, std::vector<double>& weights) {
  const std::int64_t kv = h / in.shape.group_size();
  const std::int64_t dim = in.shape.head_dim;
  const double* qv = in.query(t, h);
  weights.resize(keys.size());
  Softmax result;
  // Eight keys at a time with eight independent sums: each key's dot product still adds its D products in
  // order d = 0, 1, ... (the same double as one key at a time), but the chains overlap instead of waiting on
  // one another's additions.
  constexpr std::size_t kBlock = 8;
  const std::size_t count = keys.size();
  std::size_t i = 0;
  for (; i + kBlock <= count; i += kBlock) {
    const double* kvec[kBlock];
    for (std::size_t j = 0; j < kBlock; ++j) kvec[j] = in.key(keys[i + j], kv);
    double dot[kBlock] = {};
    for (std::int64_t d = 0; d < dim; ++d) {
      const double qd = qv[d];
      for (std::size_t j = 0; j < kBlock; ++j) dot[j] += qd * kvec[j][d];
    }
    for (std::size_t j = 0; j < kBlock; ++j) weights[i + j] = in.scale * dot[j];
  }
  for (; i < count; ++i) {
    const double* kvec = in.key(keys[i], kv);
    double dot = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) dot += qv[d] * kvec[d];
    weights[i] = in.scale * dot;
  }
  for (const double w : weights) {
    if (w > result.max_logit) result.max_logit = w;
  }
  for (double& w : weights) {
    w = std::exp(w - result.max_logit);
    result.sum += w;
  }
  return result;
}

/// Keys 0 .. count-1.
void fill_prefix(std::vector<std::int64_t>& keys, std::int64_t count) {
  keys.resize(static_cast<std::size_t>(count));
  for (std::int64_t s = 0; s < count; ++s) keys[static_cast<std::size_t>(s)] = s;
}

/// out[t,h] = sum_i weights[i] v[keys[i]] / sum, and lse, for one query and head.
void write_attention_row(const DecodedInputs& in, std::int64_t t, std::int64_t h,
                         std::span<const std::int64_t> keys, const std::vector<double>& weights,
                         const Softmax& softmax, std::vector<double>& accumulator, const OutputWriter& out,
                         const OutputWriter* lse) {
  const std::int64_t kv = h / in.shape.group_size();
  const std::int64_t dv = in.shape.value_dim;
  accumulator.assign(static_cast<std::size_t>(dv), 0.0);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const double* vv = in.value(keys[i], kv);
    for (std::int64_t d = 0; d < dv; ++d) accumulator[static_cast<std::size_t>(d)] += weights[i] * vv[d];
  }
  const double inverse = softmax.sum > 0.0 ? 1.0 / softmax.sum : 0.0;
  for (std::int64_t d = 0; d < dv; ++d) out.store(t, h, d, accumulator[static_cast<std::size_t>(d)] * inverse);
  if (lse != nullptr) lse->store(t, h, softmax.log_sum_exp());
}

// ---- exact_attention over the causal prefix, tiled ----------------------------------------------------------
// The same double operations as softmax_weights and write_attention_row, per query in the same order, but
// arranged so that each block of keys and values is read once for a tile of queries (several tokens and the
// heads of one key head) and the inner loops run along contiguous memory, where the compiler vectorises them
// (one lane per key or per channel: each lane's chain of additions is unchanged). Built for AVX-512 and for
// the baseline (target_clones); -ffp-contract=off (attention/CMakeLists.txt) keeps every product and sum rounded
// on its own, as in the plain loops.

// ThreadSanitizer instruments the ifunc resolver that target_clones emits, and the dynamic loader runs it
// before the sanitizer's runtime is up (the program dies before main), so TSan builds take the baseline only.
#if defined(__SANITIZE_THREAD__)
#define KEYSEL_EXACT_CLONES
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KEYSEL_EXACT_CLONES
#endif
#endif
#ifndef KEYSEL_EXACT_CLONES
#define KEYSEL_EXACT_CLONES [[gnu::target_clones("avx512f", "default")]]
#endif

/// Tokens per tile of exact_attention (times the heads of one key head), and keys per block of its scores.
constexpr std::int64_t kExactTileTokens = 8;
constexpr std::int64_t kExactKeyBlock = 128;
constexpr std::int64_t kExactMaxQueries = 64;  // tiles of more queries (group sizes above 8) use the plain loops
/// Largest p [T, Hq, N] that group_probabilities allocates to use the tiled kernel.
constexpr double kExactScratchBytes = 1024.0 * 1024.0 * 1024.0;

/// acc[j][0 .. n) += q[j][d] * row[0 .. n) for d = 0 .. dim - 1 in order, rows kt + d * stride.
KEYSEL_EXACT_CLONES
void block_dots(const double* const* q, std::int64_t queries, const double* kt, std::int64_t stride,
                std::int64_t dim, std::int64_t n, double* acc) {
  for (std::int64_t d = 0; d < dim; ++d) {
    const double* row = kt + d * stride;
    for (std::int64_t j = 0; j < queries; ++j) {
      const double qd = q[j][d];
      double* a = acc + j * kExactKeyBlock;
      for (std::int64_t s = 0; s < n; ++s) a[s] += qd * row[s];
    }
  }
}

/// acc[j][0 .. dv) += w[j][s] * v[s][0 .. dv) for s = begin .. end - 1 in order (only queries with s < allowed[j]).
KEYSEL_EXACT_CLONES
void accumulate_values(const double* const* w, const std::int64_t* allowed, std::int64_t queries,
                       const double* v, std::int64_t v_stride, std::int64_t dv, std::int64_t end, double* acc) {
  for (std::int64_t s = 0; s < end; ++s) {
    const double* vv = v + s * v_stride;
    for (std::int64_t j = 0; j < queries; ++j) {
      if (s >= allowed[j]) continue;
      const double weight = w[j][s];
      double* a = acc + j * dv;
      for (std::int64_t d = 0; d < dv; ++d) a[d] += weight * vv[d];
    }
  }
}

/// exact_attention into contiguous fp64 outputs: probabilities [T, Hq, N] (holding the logits, then the
/// unnormalised weights, then p), pbar [T, G, N], out [T, Hq, Dv] or null.
void exact_attention_tiled(const DecodedInputs& in, Granularity granularity, double* probabilities, double* pbar,
                           double* out) {
  const AttentionShape& shape = in.shape;
  const std::int64_t T = shape.tokens, N = shape.keys, Hq = shape.query_heads, Hkv = shape.kv_heads;
  const std::int64_t D = shape.head_dim, Dv = shape.value_dim, g = shape.group_size();
  const std::int64_t groups = group_count(granularity, Hq, Hkv);
  const std::int64_t heads_per_group = Hq / groups;
  // K transposed per key head: kt[kv][d][s].
  std::vector<double> kt(static_cast<std::size_t>(Hkv * D * N));
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t kv = 0; kv < Hkv; ++kv) {
    for (std::int64_t d = 0; d < D; ++d) {
      double* row = kt.data() + (kv * D + d) * N;
      for (std::int64_t s = 0; s < N; ++s) row[s] = in.key(s, kv)[d];
    }
  }
  const std::int64_t token_tiles = (T + kExactTileTokens - 1) / kExactTileTokens;
  std::vector<double> max_logit(static_cast<std::size_t>(T * Hq)), sums(static_cast<std::size_t>(T * Hq));
  const auto row_of = [&](std::int64_t t, std::int64_t h) { return probabilities + (t * Hq + h) * N; };

  // Logits (scale * q.k) of allowed keys into the probability rows; softmax weights in place.
#pragma omp parallel
  {
    std::vector<double> acc(static_cast<std::size_t>(kExactMaxQueries * kExactKeyBlock));
    std::vector<const double*> q(static_cast<std::size_t>(kExactMaxQueries));
#pragma omp for collapse(2) schedule(dynamic)
    for (std::int64_t tile = 0; tile < token_tiles; ++tile) {
      for (std::int64_t kv = 0; kv < Hkv; ++kv) {
        const std::int64_t t0 = tile * kExactTileTokens, t1 = std::min(T, t0 + kExactTileTokens);
        std::int64_t queries = 0, longest = 0;
        for (std::int64_t t = t0; t < t1; ++t) {
          longest = std::max(longest, in.allowed[static_cast<std::size_t>(t)]);
          for (std::int64_t h = kv * g; h < (kv + 1) * g; ++h) q[static_cast<std::size_t>(queries++)] = in.query(t, h);
        }
        for (std::int64_t s0 = 0; s0 < longest; s0 += kExactKeyBlock) {
          const std::int64_t n = std::min(kExactKeyBlock, longest - s0);
          std::fill(acc.begin(), acc.begin() + queries * kExactKeyBlock, 0.0);
          block_dots(q.data(), queries, kt.data() + kv * D * N + s0, N, D, n, acc.data());
          std::int64_t j = 0;
          for (std::int64_t t = t0; t < t1; ++t) {
            const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
            for (std::int64_t h = kv * g; h < (kv + 1) * g; ++h, ++j) {
              double* row = row_of(t, h);
              const double* a = acc.data() + j * kExactKeyBlock;
              for (std::int64_t s = s0; s < std::min(s0 + n, allowed); ++s) row[s] = in.scale * a[s - s0];
            }
          }
        }
      }
    }
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t h = 0; h < Hq; ++h) {
        double* row = row_of(t, h);
        const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
        Softmax softmax;
        for (std::int64_t s = 0; s < allowed; ++s) {
          if (row[s] > softmax.max_logit) softmax.max_logit = row[s];
        }
        for (std::int64_t s = 0; s < allowed; ++s) {
          row[s] = std::exp(row[s] - softmax.max_logit);
          softmax.sum += row[s];
        }
        max_logit[static_cast<std::size_t>(t * Hq + h)] = softmax.max_logit;
        sums[static_cast<std::size_t>(t * Hq + h)] = softmax.sum;
      }
    }
    // pbar from the weights, heads in ascending order (group_probabilities' sum).
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t group = 0; group < groups; ++group) {
        const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
        double* mean = pbar + (t * groups + group) * N;
        for (std::int64_t s = 0; s < allowed; ++s) mean[s] = 0.0;
        for (std::int64_t h = group * heads_per_group; h < (group + 1) * heads_per_group; ++h) {
          const double factor = 1.0 / (sums[static_cast<std::size_t>(t * Hq + h)] * static_cast<double>(heads_per_group));
          const double* w = row_of(t, h);
          for (std::int64_t s = 0; s < allowed; ++s) mean[s] += w[s] * factor;
        }
        for (std::int64_t s = allowed; s < N; ++s) mean[s] = 0.0;
      }
    }
    // Outputs: sum_s w[s] v[s] in key order, then / sum (write_attention_row).
    if (out != nullptr) {
      std::vector<double> out_acc(static_cast<std::size_t>(kExactMaxQueries * Dv));
      std::vector<const double*> w(static_cast<std::size_t>(kExactMaxQueries));
      std::vector<std::int64_t> allowed(static_cast<std::size_t>(kExactMaxQueries));
#pragma omp for collapse(2) schedule(dynamic)
      for (std::int64_t tile = 0; tile < token_tiles; ++tile) {
        for (std::int64_t kv = 0; kv < Hkv; ++kv) {
          const std::int64_t t0 = tile * kExactTileTokens, t1 = std::min(T, t0 + kExactTileTokens);
          std::int64_t queries = 0, longest = 0;
          for (std::int64_t t = t0; t < t1; ++t) {
            longest = std::max(longest, in.allowed[static_cast<std::size_t>(t)]);
            for (std::int64_t h = kv * g; h < (kv + 1) * g; ++h) {
              w[static_cast<std::size_t>(queries)] = row_of(t, h);
              allowed[static_cast<std::size_t>(queries++)] = in.allowed[static_cast<std::size_t>(t)];
            }
          }
          std::fill(out_acc.begin(), out_acc.begin() + queries * Dv, 0.0);
          accumulate_values(w.data(), allowed.data(), queries, in.v.data() + kv * Dv, Hkv * Dv, Dv, longest,
                            out_acc.data());
          std::int64_t j = 0;
          for (std::int64_t t = t0; t < t1; ++t) {
            for (std::int64_t h = kv * g; h < (kv + 1) * g; ++h, ++j) {
              const double sum = sums[static_cast<std::size_t>(t * Hq + h)];
              const double inverse = sum > 0.0 ? 1.0 / sum : 0.0;
              for (std::int64_t d = 0; d < Dv; ++d) out[(t * Hq + h) * Dv + d] = out_acc[static_cast<std::size_t>(j * Dv + d)] * inverse;
            }
          }
        }
      }
    }
    // p = weight / sum; disallowed keys 0.
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t h = 0; h < Hq; ++h) {
        double* row = row_of(t, h);
        const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
        const double sum = sums[static_cast<std::size_t>(t * Hq + h)];
        for (std::int64_t s = 0; s < allowed; ++s) row[s] = row[s] / sum;
        for (std::int64_t s = allowed; s < N; ++s) row[s] = 0.0;
      }
    }
  }
}

}  // namespace

void attention_probabilities(const AttentionInputs& inputs, const TensorView& probabilities) {
  constexpr std::string_view function = "attention_probabilities";
  const AttentionShape shape = inputs.validate(function, false);
  check_output(function, probabilities, "probabilities", {shape.tokens, shape.query_heads, shape.keys},
               {DType::fp64});

  const DecodedInputs in = decode(inputs, shape);
  const OutputWriter out(probabilities);
#pragma omp parallel
  {
    std::vector<std::int64_t> keys;
    std::vector<double> weights;
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t h = 0; h < shape.query_heads; ++h) {
        const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
        fill_prefix(keys, allowed);
        const Softmax softmax = softmax_weights(in, t, h, keys, weights);
        for (std::int64_t s = 0; s < allowed; ++s) {
          out.store(t, h, s, weights[static_cast<std::size_t>(s)] / softmax.sum);
        }
        for (std::int64_t s = allowed; s < shape.keys; ++s) out.store(t, h, s, 0.0);
      }
    }
  }
}

void group_probabilities(const AttentionInputs& inputs, Granularity granularity, const TensorView& pbar) {
  constexpr std::string_view function = "group_probabilities";
  const AttentionShape shape = inputs.validate(function, false);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_output(function, pbar, "pbar", {shape.tokens, groups, shape.keys}, {DType::fp64});

  const DecodedInputs in = decode(inputs, shape);
  // The tiled kernel needs p [T, Hq, N] as scratch: taken when that stays small (the same values either way).
  const double scratch = static_cast<double>(shape.tokens) * static_cast<double>(shape.query_heads) *
                         static_cast<double>(shape.keys) * sizeof(double);
  if (pbar.dtype() == DType::fp64 && pbar.is_contiguous() && shape.tokens > 0 && scratch <= kExactScratchBytes &&
      kExactTileTokens * shape.group_size() <= kExactMaxQueries) {
    std::vector<double> probabilities(static_cast<std::size_t>(shape.tokens * shape.query_heads * shape.keys));
    exact_attention_tiled(in, granularity, probabilities.data(), pbar.mutable_data<double>(), nullptr);
    return;
  }
  const OutputWriter out(pbar);
  const std::int64_t heads_per_group = shape.query_heads / groups;
#pragma omp parallel
  {
    std::vector<std::int64_t> keys;
    std::vector<double> weights;
    std::vector<double> mean;
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
        fill_prefix(keys, allowed);
        mean.assign(static_cast<std::size_t>(allowed), 0.0);
        for (std::int64_t h = g * heads_per_group; h < (g + 1) * heads_per_group; ++h) {
          const Softmax softmax = softmax_weights(in, t, h, keys, weights);
          const double factor = 1.0 / (softmax.sum * static_cast<double>(heads_per_group));
          for (std::size_t s = 0; s < mean.size(); ++s) mean[s] += weights[s] * factor;
        }
        for (std::int64_t s = 0; s < allowed; ++s) out.store(t, g, s, mean[static_cast<std::size_t>(s)]);
        for (std::int64_t s = allowed; s < shape.keys; ++s) out.store(t, g, s, 0.0);
      }
    }
  }
}

void exact_attention(const AttentionInputs& inputs, Granularity granularity, const TensorView& probabilities,
                     const TensorView& pbar, const TensorView& out) {
  constexpr std::string_view function = "exact_attention";
  const AttentionShape shape = inputs.validate(function, !out.empty());
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_output(function, probabilities, "probabilities", {shape.tokens, shape.query_heads, shape.keys},
               {DType::fp64});
  check_output(function, pbar, "pbar", {shape.tokens, groups, shape.keys}, {DType::fp64});
  if (!out.empty()) {
    check_output(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim},
                 {DType::fp32, DType::fp64});
  }

  const DecodedInputs in = decode(inputs, shape);
  const auto contiguous_fp64 = [](const TensorView& view) {
    return view.dtype() == DType::fp64 && view.is_contiguous();
  };
  if (contiguous_fp64(probabilities) && contiguous_fp64(pbar) && (out.empty() || contiguous_fp64(out)) &&
      shape.tokens > 0 && kExactTileTokens * shape.group_size() <= kExactMaxQueries) {
    exact_attention_tiled(in, granularity, probabilities.mutable_data<double>(), pbar.mutable_data<double>(),
                          out.empty() ? nullptr : out.mutable_data<double>());
    return;
  }
  const OutputWriter p_writer(probabilities);
  const OutputWriter pbar_writer(pbar);
  const OutputWriter out_writer = out.empty() ? p_writer : OutputWriter(out);
  const std::int64_t heads_per_group = shape.query_heads / groups;
  // The loops of attention_probabilities, group_probabilities and full_attention, sharing each (t, h)'s
  // softmax_weights: every stored value is computed by the same operations in the same order.
#pragma omp parallel
  {
    std::vector<std::int64_t> keys;
    std::vector<double> weights;
    std::vector<double> mean;
    std::vector<double> accumulator;
#pragma omp for collapse(2) schedule(dynamic)
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t allowed = in.allowed[static_cast<std::size_t>(t)];
        fill_prefix(keys, allowed);
        mean.assign(static_cast<std::size_t>(allowed), 0.0);
        for (std::int64_t h = g * heads_per_group; h < (g + 1) * heads_per_group; ++h) {
          const Softmax softmax = softmax_weights(in, t, h, keys, weights);
          for (std::int64_t s = 0; s < allowed; ++s) {
            p_writer.store(t, h, s, weights[static_cast<std::size_t>(s)] / softmax.sum);
          }
          for (std::int64_t s = allowed; s < shape.keys; ++s) p_writer.store(t, h, s, 0.0);
          const double factor = 1.0 / (softmax.sum * static_cast<double>(heads_per_group));
          for (std::size_t s = 0; s < mean.size(); ++s) mean[s] += weights[s] * factor;
          if (!out.empty()) write_attention_row(in, t, h, keys, weights, softmax, accumulator, out_writer, nullptr);
        }
        for (std::int64_t s = 0; s < allowed; ++s) pbar_writer.store(t, g, s, mean[static_cast<std::size_t>(s)]);
        for (std::int64_t s = allowed; s < shape.keys; ++s) pbar_writer.store(t, g, s, 0.0);
      }
    }
  }
}

void full_attention(const AttentionInputs& inputs, const TensorView& out, const TensorView& lse) {
  constexpr std::string_view function = "full_attention";
  const AttentionShape shape = inputs.validate(function, true);
  check_output(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim},
               {DType::fp32, DType::fp64});
  if (!lse.empty()) {
    check_output(function, lse, "lse", {shape.tokens, shape.query_heads}, {DType::fp32, DType::fp64});
  }

  const DecodedInputs in = decode(inputs, shape);
  const OutputWriter out_writer(out);
  const OutputWriter lse_writer = lse.empty() ? out_writer : OutputWriter(lse);
  const OutputWriter* lse_ptr = lse.empty() ? nullptr : &lse_writer;
#pragma omp parallel
  {
    std::vector<std::int64_t> keys;
    std::vector<double> weights;
    std::vector<double> accumulator;
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t h = 0; h < shape.query_heads; ++h) {
        fill_prefix(keys, in.allowed[static_cast<std::size_t>(t)]);
        const Softmax softmax = softmax_weights(in, t, h, keys, weights);
        write_attention_row(in, t, h, keys, weights, softmax, accumulator, out_writer, lse_ptr);
      }
    }
  }
}

void sparse_attention_reference(const AttentionInputs& inputs, const TensorView& selection,
                                Granularity granularity, const TensorView& out, const TensorView& lse) {
  constexpr std::string_view function = "sparse_attention_reference";
  const AttentionShape shape = inputs.validate(function, true);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  check_output(function, out, "out", {shape.tokens, shape.query_heads, shape.value_dim},
               {DType::fp32, DType::fp64});
  if (!lse.empty()) {
    check_output(function, lse, "lse", {shape.tokens, shape.query_heads}, {DType::fp32, DType::fp64});
  }
  validate_selection(function, selection, "selection", inputs.positions, shape.keys, groups);

  const DecodedInputs in = decode(inputs, shape);
  const std::vector<double> selected = to_double_vector(selection);  // [T, G, W], validated above
  const std::int64_t width = selection.size(2);
  std::vector<std::int64_t> group_of(static_cast<std::size_t>(shape.query_heads));
  for (std::int64_t h = 0; h < shape.query_heads; ++h) {
    group_of[static_cast<std::size_t>(h)] = group_of_head(granularity, h, shape.query_heads, shape.kv_heads);
  }
  const OutputWriter out_writer(out);
  const OutputWriter lse_writer = lse.empty() ? out_writer : OutputWriter(lse);
  const OutputWriter* lse_ptr = lse.empty() ? nullptr : &lse_writer;
#pragma omp parallel
  {
    std::vector<std::int64_t> keys;
    std::vector<double> weights;
    std::vector<double> accumulator;
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t h = 0; h < shape.query_heads; ++h) {
        const std::int64_t g = group_of[static_cast<std::size_t>(h)];
        const double* row = selected.data() + (t * groups + g) * width;
        keys.clear();
        for (std::int64_t i = 0; i < width && row[i] >= 0.0; ++i) keys.push_back(static_cast<std::int64_t>(row[i]));
        const Softmax softmax = softmax_weights(in, t, h, keys, weights);
        write_attention_row(in, t, h, keys, weights, softmax, accumulator, out_writer, lse_ptr);
      }
    }
  }
}

void sparse_attention_backward_reference(const AttentionInputs& inputs, const TensorView& selection,
                                         Granularity granularity, const TensorView& grad_out,
                                         const TensorView& grad_q, const TensorView& grad_k,
                                         const TensorView& grad_v, const TensorView& grad_lse) {
  constexpr std::string_view function = "sparse_attention_backward_reference";
  const AttentionShape shape = inputs.validate(function, true);
  const std::int64_t groups = group_count(granularity, shape.query_heads, shape.kv_heads);
  expect_shape(function, grad_out, "grad_out", {shape.tokens, shape.query_heads, shape.value_dim});
  expect_dtype(function, grad_out, "grad_out", {DType::fp32, DType::bf16, DType::fp16, DType::fp64});
  expect_device(function, grad_out, "grad_out", Device::cpu());
  check_output(function, grad_q, "grad_q", {shape.tokens, shape.query_heads, shape.head_dim},
               {DType::fp32, DType::fp64});
  check_output(function, grad_k, "grad_k", {shape.keys, shape.kv_heads, shape.head_dim}, {DType::fp32, DType::fp64});
  check_output(function, grad_v, "grad_v", {shape.keys, shape.kv_heads, shape.value_dim},
               {DType::fp32, DType::fp64});
  if (!grad_lse.empty()) {
    expect_shape(function, grad_lse, "grad_lse", {shape.tokens, shape.query_heads});
    expect_dtype(function, grad_lse, "grad_lse", {DType::fp32, DType::fp64});
    expect_device(function, grad_lse, "grad_lse", Device::cpu());
  }
  validate_selection(function, selection, "selection", inputs.positions, shape.keys, groups);

  const DecodedInputs in = decode(inputs, shape);
  const std::vector<double> d_out = to_double_vector(grad_out);  // [T, Hq, Dv]
  const std::vector<double> d_lse =
      grad_lse.empty() ? std::vector<double>(static_cast<std::size_t>(shape.tokens * shape.query_heads), 0.0)
                       : to_double_vector(grad_lse);  // [T, Hq]
  const std::vector<double> selected = to_double_vector(selection);
  const std::int64_t width = selection.size(2);
  const std::int64_t dim = shape.head_dim, dv = shape.value_dim;
  std::vector<double> dq(static_cast<std::size_t>(shape.tokens * shape.query_heads * dim), 0.0);
  std::vector<double> dk(static_cast<std::size_t>(shape.keys * shape.kv_heads * dim), 0.0);
  std::vector<double> dvv(static_cast<std::size_t>(shape.keys * shape.kv_heads * dv), 0.0);

  // Plain sequential loops: dK and dV gather from every (t, h), which keeps this the obvious transcription.
  std::vector<std::int64_t> keys;
  std::vector<double> weights;
  std::vector<double> out(static_cast<std::size_t>(dv));
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t h = 0; h < shape.query_heads; ++h) {
      const std::int64_t g = group_of_head(granularity, h, shape.query_heads, shape.kv_heads);
      const std::int64_t kv = h / shape.group_size();
      const double* row = selected.data() + (t * groups + g) * width;
      keys.clear();
      for (std::int64_t i = 0; i < width && row[i] >= 0.0; ++i) keys.push_back(static_cast<std::int64_t>(row[i]));
      if (keys.empty()) continue;
      const Softmax softmax = softmax_weights(in, t, h, keys, weights);
      for (double& w : weights) w /= softmax.sum;  // P over the selection
      const double* go = d_out.data() + (t * shape.query_heads + h) * dv;
      std::fill(out.begin(), out.end(), 0.0);
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const double* vv = in.value(keys[i], kv);
        for (std::int64_t d = 0; d < dv; ++d) out[static_cast<std::size_t>(d)] += weights[i] * vv[d];
      }
      double delta = 0.0;
      for (std::int64_t d = 0; d < dv; ++d) delta += go[d] * out[static_cast<std::size_t>(d)];
      const double* qv = in.query(t, h);
      double* dqv = dq.data() + (t * shape.query_heads + h) * dim;
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const std::int64_t s = keys[i];
        const double* vv = in.value(s, kv);
        const double* kvec = in.key(s, kv);
        double dp = 0.0;
        for (std::int64_t d = 0; d < dv; ++d) dp += go[d] * vv[d];
        // d lse / d logit = P: the lse term adds P * dLse.
        const double ds = weights[i] * (dp - delta + d_lse[static_cast<std::size_t>(t * shape.query_heads + h)]);
        double* dkv = dk.data() + (s * shape.kv_heads + kv) * dim;
        double* dvv_row = dvv.data() + (s * shape.kv_heads + kv) * dv;
        for (std::int64_t d = 0; d < dim; ++d) {
          dqv[d] += in.scale * ds * kvec[d];
          dkv[d] += in.scale * ds * qv[d];
        }
        for (std::int64_t d = 0; d < dv; ++d) dvv_row[d] += weights[i] * go[d];
      }
    }
  }
  const OutputWriter q_writer(grad_q), k_writer(grad_k), v_writer(grad_v);
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t h = 0; h < shape.query_heads; ++h) {
      const double* row = dq.data() + (t * shape.query_heads + h) * dim;
      for (std::int64_t d = 0; d < dim; ++d) q_writer.store(t, h, d, row[d]);
    }
  }
  for (std::int64_t s = 0; s < shape.keys; ++s) {
    for (std::int64_t kv = 0; kv < shape.kv_heads; ++kv) {
      const double* k_row = dk.data() + (s * shape.kv_heads + kv) * dim;
      const double* v_row = dvv.data() + (s * shape.kv_heads + kv) * dv;
      for (std::int64_t d = 0; d < dim; ++d) k_writer.store(s, kv, d, k_row[d]);
      for (std::int64_t d = 0; d < dv; ++d) v_writer.store(s, kv, d, v_row[d]);
    }
  }
}

}  // namespace keysel
