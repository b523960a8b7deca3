// Decoding with a Lightning Indexer and top-k sparse attention, the way a serving engine would wire it:
//
//   1. prefill: fill the KV cache (bf16) and the indexer's low-precision key cache (fp8) with the prompt's keys;
//   2. every decode step: append the new token's K/V and indexer key, select k keys with the indexer, run exact
//      attention over just those keys, and (here, to show the fidelity) compare with full attention.
//
//   cmake -S examples -B build-examples -DCMAKE_PREFIX_PATH=<keysel install prefix>
//   cmake --build build-examples && ./build-examples/decode_with_indexer
//
// The model is a stand-in (a toy with topics, below): the indexer key of a token is the mean of its key heads
// and the indexer queries are the step's query heads, so the indexer score follows the main attention roughly,
// as a trained indexer does. Replace `make_token` and the indexer inputs with your model's projections.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include <keysel/attention/sparse_attention.h>
#include <keysel/core/dtype.h>
#include <keysel/core/random.h>
#include <keysel/core/selection.h>
#include <keysel/indexer/lightning_indexer.h>
#include <keysel/indexer/topk.h>

namespace {

constexpr std::int64_t kQueryHeads = 16, kKvHeads = 2, kDim = 128;  // GQA, g = 8
constexpr std::int64_t kPrompt = 8192, kSteps = 8, kCapacity = kPrompt + kSteps;

/// One token's projections: query [Hq, D], key and value [Hkv, D] (fp32). A toy model with structure: every
/// token belongs to one of kTopics topics (a direction in head space); its keys lean towards the topic and
/// a query looks for its own topic, so attention concentrates on the ~N/kTopics tokens of that topic.
constexpr std::int64_t kTopics = 64;

struct Token {
  std::vector<float> q, k, v;
};

Token make_token(keysel::RandomStream& rng, const std::vector<float>& topics) {
  Token token{std::vector<float>(kQueryHeads * kDim), std::vector<float>(kKvHeads * kDim),
              std::vector<float>(kKvHeads * kDim)};
  rng.fill_normal(token.q, 0.0, 0.5);
  rng.fill_normal(token.k);
  rng.fill_normal(token.v);
  const float* topic = topics.data() + static_cast<std::int64_t>(rng.uniform_int(kTopics)) * kDim;
  const float* wanted = topics.data() + static_cast<std::int64_t>(rng.uniform_int(kTopics)) * kDim;
  for (std::int64_t i = 0; i < kKvHeads * kDim; ++i) token.k[i] += 0.7f * topic[i % kDim];
  for (std::int64_t i = 0; i < kQueryHeads * kDim; ++i) token.q[i] += 0.7f * wanted[i % kDim];
  return token;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main() {
  keysel::RandomStream rng(42);
  std::vector<float> topics(kTopics * kDim);  // unit directions scaled by sqrt(D): entries ~ N(0, 1)
  rng.fill_normal(topics);

  // ---- the caches: KV in bf16 [capacity, Hkv, D], indexer keys in fp8 (one DI = D key per token) -----------
  std::vector<std::uint16_t> k_cache(kCapacity * kKvHeads * kDim), v_cache(kCapacity * kKvHeads * kDim);
  keysel::LightningIndexer indexer(/*heads=*/kQueryHeads, /*dim=*/kDim, {.format = keysel::DType::fp8_e4m3});
  std::int64_t n = 0;  // tokens in the cache

  const auto append = [&](const Token& token) {
    std::vector<float> indexer_key(kDim, 0.0f);
    for (std::int64_t i = 0; i < kKvHeads * kDim; ++i) {
      k_cache[n * kKvHeads * kDim + i] = keysel::fp32_to_bf16_bits(token.k[i]);
      v_cache[n * kKvHeads * kDim + i] = keysel::fp32_to_bf16_bits(token.v[i]);
      indexer_key[i % kDim] += token.k[i] / kKvHeads;
    }
    indexer.append_keys(1, indexer_key.data());
    ++n;
  };

  for (std::int64_t s = 0; s < kPrompt; ++s) append(make_token(rng, topics));  // prefill

  // ---- the selection policy: k = 512 keys per token, shared by all heads (DSA), 4 sinks, 64 recent -----------
  keysel::SelectionPolicy policy;
  policy.k = 512;
  policy.granularity = keysel::Granularity::per_token;
  policy.n_sink = 4;
  policy.n_local = 64;

  std::vector<std::int32_t> selection(policy.width());
  std::vector<float> out(kQueryHeads * kDim), lse(kQueryHeads), full_out(kQueryHeads * kDim), full_lse(kQueryHeads);
  std::vector<float> weights(kQueryHeads, 1.0f / kQueryHeads);

  std::printf("decode with a Lightning Indexer (fp8 keys) and top-%lld sparse attention, Hq=%lld Hkv=%lld D=%lld\n",
              static_cast<long long>(policy.k), static_cast<long long>(kQueryHeads),
              static_cast<long long>(kKvHeads), static_cast<long long>(kDim));
  std::printf("%6s %10s %10s %10s %10s %10s %10s\n", "N", "select_us", "sparse_us", "full_us", "out_err",
              "lse_gap", "exact_err");
  double worst = 0.0;
  for (std::int64_t step = 0; step < kSteps; ++step) {
    const Token token = make_token(rng, topics);
    append(token);  // the new token's K/V and indexer key join the caches first: it attends to itself
    std::vector<std::int32_t> position{static_cast<std::int32_t>(n - 1)};

    // Views over the first n tokens of the caches.
    keysel::AttentionInputs inputs;
    inputs.q = keysel::TensorView(token.q.data(), keysel::DType::fp32, {1, kQueryHeads, kDim});
    inputs.k = keysel::TensorView(k_cache.data(), keysel::DType::bf16, {n, kKvHeads, kDim});
    inputs.v = keysel::TensorView(v_cache.data(), keysel::DType::bf16, {n, kKvHeads, kDim});
    inputs.positions = keysel::TensorView(position.data(), keysel::DType::int32, {1});
    const keysel::TensorView selection_view(selection.data(), keysel::DType::int32, {1, 1, policy.width()});

    auto start = std::chrono::steady_clock::now();
    indexer.select(keysel::TensorView(token.q.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}),
                   keysel::TensorView(weights.data(), keysel::DType::fp32, {1, kQueryHeads}), inputs.positions,
                   policy, selection_view);
    const double select_s = seconds_since(start);

    start = std::chrono::steady_clock::now();
    keysel::sparse_attention(inputs, selection_view, policy.granularity,
                             keysel::TensorView(out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}),
                             keysel::TensorView(lse.data(), keysel::DType::fp32, {1, kQueryHeads}));
    const double sparse_s = seconds_since(start);

    start = std::chrono::steady_clock::now();
    keysel::full_attention_fast(inputs, keysel::TensorView(full_out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}),
                                keysel::TensorView(full_lse.data(), keysel::DType::fp32, {1, kQueryHeads}));
    const double full_s = seconds_since(start);

    // Relative output error ||o_A - o|| / ||o|| averaged over heads (SPEC §4 out_err), and the largest lse gap
    // (-log of the share of attention mass the selection keeps, per head).
    const auto out_err = [&](const std::vector<float>& o) {
      double err = 0.0;
      for (std::int64_t h = 0; h < kQueryHeads; ++h) {
        double diff = 0.0, norm = 0.0;
        for (std::int64_t d = 0; d < kDim; ++d) {
          const double a = o[h * kDim + d], b = full_out[h * kDim + d];
          diff += (a - b) * (a - b);
          norm += b * b;
        }
        err += std::sqrt(diff / norm) / kQueryHeads;
      }
      return err;
    };
    const double err = out_err(out);
    double lse_gap = 0.0;
    for (std::int64_t h = 0; h < kQueryHeads; ++h) lse_gap = std::fmax(lse_gap, full_lse[h] - lse[h]);

    // For comparison, the exact top-k (the best any selector of k keys can do; computed in double, slow).
    keysel::exact_topk(inputs, policy, selection_view);
    keysel::sparse_attention(inputs, selection_view, policy.granularity,
                             keysel::TensorView(out.data(), keysel::DType::fp32, {1, kQueryHeads, kDim}));
    const double exact_err = out_err(out);

    worst = std::fmax(worst, err);
    std::printf("%6lld %10.1f %10.1f %10.1f %10.4f %10.4f %10.4f\n", static_cast<long long>(n), select_s * 1e6,
                sparse_s * 1e6, full_s * 1e6, err, lse_gap, exact_err);
  }
  // A sanity bound for this synthetic model; a real model's numbers are what keysel studies measure.
  return std::isfinite(worst) && worst < 1.0 ? 0 : 1;
}
