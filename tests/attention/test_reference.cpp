// The double-precision reference attention against naive loops written here, hand-computed values, and its
// argument checks (SPEC §1, §2, §4 o_A, §6).
#include "keysel/attention/reference.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "keysel/core/random.h"

namespace keysel {
namespace {

constexpr double kSentinel = -12345.25;

struct Problem {
  std::int64_t T = 0, N = 0, Hq = 0, Hkv = 0, D = 0, Dv = 0;
  std::vector<float> q, k, v;
  std::vector<std::int32_t> positions;
  double scale = 0.0;

  std::int64_t g() const { return Hq / Hkv; }
  double effective_scale() const { return scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(D)); }
  AttentionInputs inputs() const {
    AttentionInputs in;
    in.q = TensorView(q.data(), DType::fp32, {T, Hq, D});
    in.k = TensorView(k.data(), DType::fp32, {N, Hkv, D});
    if (Dv > 0) in.v = TensorView(v.data(), DType::fp32, {N, Hkv, Dv});
    in.positions = TensorView(positions.data(), DType::int32, {T});
    in.scale = scale;
    return in;
  }
};

Problem make_problem(std::uint64_t seed, std::int64_t T, std::int64_t N, std::int64_t Hq, std::int64_t Hkv,
                     std::int64_t D, std::int64_t Dv, std::vector<std::int32_t> positions) {
  Problem p;
  p.T = T, p.N = N, p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.Dv = Dv;
  RandomStream rng(seed);
  p.q.resize(static_cast<std::size_t>(T * Hq * D));
  p.k.resize(static_cast<std::size_t>(N * Hkv * D));
  p.v.resize(static_cast<std::size_t>(N * Hkv * Dv));
  rng.fill_normal(p.q, 0.0, 1.5);
  rng.fill_normal(p.k);
  rng.fill_normal(p.v);
  p.positions = std::move(positions);
  return p;
}

/// The awkward shape most tests use: positions unsorted, some below N - 1, one beyond N - 1.
Problem awkward_problem(std::uint64_t seed) {
  return make_problem(seed, 5, 37, 6, 2, 13, 7, {20, 36, 3, 0, 50});
}

std::int64_t allowed_of(const Problem& p, std::int64_t t) {
  return std::min<std::int64_t>(p.positions[static_cast<std::size_t>(t)] + 1, p.N);
}

/// logit of query (t, h) against key s, the key head found by walking the heads group by group.
double naive_logit(const Problem& p, std::int64_t t, std::int64_t h, std::int64_t s) {
  std::int64_t kv_head = -1;
  for (std::int64_t kv = 0, head = 0; kv < p.Hkv; ++kv) {
    for (std::int64_t j = 0; j < p.g(); ++j, ++head) {
      if (head == h) kv_head = kv;
    }
  }
  double dot = 0.0;
  for (std::int64_t d = 0; d < p.D; ++d) {
    dot += static_cast<double>(p.q[static_cast<std::size_t>((t * p.Hq + h) * p.D + d)]) *
           static_cast<double>(p.k[static_cast<std::size_t>((s * p.Hkv + kv_head) * p.D + d)]);
  }
  return p.effective_scale() * dot;
}

std::int64_t naive_kv_head(const Problem& p, std::int64_t h) { return h * p.Hkv / p.Hq; }

/// p[t,h,s] by the textbook formula, [T, Hq, N].
std::vector<double> naive_probabilities(const Problem& p) {
  std::vector<double> out(static_cast<std::size_t>(p.T * p.Hq * p.N), 0.0);
  for (std::int64_t t = 0; t < p.T; ++t) {
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      const std::int64_t allowed = allowed_of(p, t);
      double max_logit = -std::numeric_limits<double>::infinity();
      for (std::int64_t s = 0; s < allowed; ++s) max_logit = std::max(max_logit, naive_logit(p, t, h, s));
      double z = 0.0;
      for (std::int64_t s = 0; s < allowed; ++s) z += std::exp(naive_logit(p, t, h, s) - max_logit);
      for (std::int64_t s = 0; s < allowed; ++s) {
        out[static_cast<std::size_t>((t * p.Hq + h) * p.N + s)] = std::exp(naive_logit(p, t, h, s) - max_logit) / z;
      }
    }
  }
  return out;
}

double naive_full_lse(const Problem& p, std::int64_t t, std::int64_t h) {
  double max_logit = -std::numeric_limits<double>::infinity();
  for (std::int64_t s = 0; s < allowed_of(p, t); ++s) max_logit = std::max(max_logit, naive_logit(p, t, h, s));
  double z = 0.0;
  for (std::int64_t s = 0; s < allowed_of(p, t); ++s) z += std::exp(naive_logit(p, t, h, s) - max_logit);
  return max_logit + std::log(z);
}

/// o over `keys` with p renormalised on them (SPEC §4 o_A) and lse over them, from the naive probabilities.
void naive_attention_over(const Problem& p, const std::vector<double>& probs, std::int64_t t, std::int64_t h,
                          const std::vector<std::int64_t>& keys, std::vector<double>& o, double& lse) {
  o.assign(static_cast<std::size_t>(p.Dv), 0.0);
  double mass = 0.0;
  for (const std::int64_t s : keys) mass += probs[static_cast<std::size_t>((t * p.Hq + h) * p.N + s)];
  for (const std::int64_t s : keys) {
    const double w = probs[static_cast<std::size_t>((t * p.Hq + h) * p.N + s)] / mass;
    for (std::int64_t d = 0; d < p.Dv; ++d) {
      o[static_cast<std::size_t>(d)] +=
          w * static_cast<double>(p.v[static_cast<std::size_t>((s * p.Hkv + naive_kv_head(p, h)) * p.Dv + d)]);
    }
  }
  if (keys.empty()) {
    o.assign(static_cast<std::size_t>(p.Dv), 0.0);
    lse = -std::numeric_limits<double>::infinity();
  } else {
    lse = naive_full_lse(p, t, h) + std::log(mass);
  }
}

/// The query heads of group G under each granularity, listed by a rule independent of the library.
std::vector<std::int64_t> naive_heads_of_group(const Problem& p, Granularity granularity, std::int64_t group) {
  std::vector<std::int64_t> heads;
  for (std::int64_t h = 0; h < p.Hq; ++h) {
    const bool member = granularity == Granularity::per_head      ? h == group
                        : granularity == Granularity::per_kv_head ? naive_kv_head(p, h) == group
                                                                  : true;
    if (member) heads.push_back(h);
  }
  return heads;
}

std::int64_t naive_group_count(const Problem& p, Granularity granularity) {
  return granularity == Granularity::per_head ? p.Hq : granularity == Granularity::per_kv_head ? p.Hkv : 1;
}

/// An fp64 or fp32 output buffer pre-filled with a sentinel.
struct Buffer {
  std::vector<double> f64;
  std::vector<float> f32;
  TensorView view;

  Buffer(std::initializer_list<std::int64_t> shape, DType dtype = DType::fp64) {
    std::int64_t count = 1;
    for (auto e : shape) count *= e;
    if (dtype == DType::fp32) {
      f32.assign(static_cast<std::size_t>(count), static_cast<float>(kSentinel));
      view = TensorView(f32.data(), DType::fp32, shape);
    } else {
      f64.assign(static_cast<std::size_t>(count), kSentinel);
      view = TensorView(f64.data(), dtype, shape);
    }
  }
  double at(std::size_t i) const { return f32.empty() ? f64[i] : static_cast<double>(f32[i]); }
  std::size_t size() const { return f32.empty() ? f64.size() : f32.size(); }
  bool untouched() const {
    for (std::size_t i = 0; i < size(); ++i) {
      if (at(i) != kSentinel) return false;
    }
    return true;
  }
  TensorView read_only() const {
    return TensorView(static_cast<const void*>(view.raw_data()), view.dtype(), view.shape());
  }
};

void expect_error_naming(const std::function<void()>& call, const std::string& function,
                         const std::string& argument) {
  try {
    call();
    ADD_FAILURE() << "expected keysel::Error naming '" << argument << "'";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("keysel::" + function), std::string::npos) << message;
    EXPECT_NE(message.find("argument '" + argument + "'"), std::string::npos) << message;
  }
}

/// Every allowed key of each (t, G), in a shuffled order, padded with -1 to width N.
std::vector<std::int32_t> all_allowed_selection(const Problem& p, std::int64_t groups, std::uint64_t seed) {
  RandomStream rng(seed);
  std::vector<std::int32_t> sel(static_cast<std::size_t>(p.T * groups * p.N), -1);
  for (std::int64_t t = 0; t < p.T; ++t) {
    for (std::int64_t g = 0; g < groups; ++g) {
      std::vector<std::int32_t> keys;
      for (std::int64_t s = 0; s < allowed_of(p, t); ++s) keys.push_back(static_cast<std::int32_t>(s));
      rng.shuffle(std::span<std::int32_t>(keys));
      std::copy(keys.begin(), keys.end(), sel.begin() + (t * groups + g) * p.N);
    }
  }
  return sel;
}

const Granularity kGranularities[] = {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token};

// ---- probabilities ---------------------------------------------------------------------------------------

TEST(AttentionProbabilities, SumToOneOverAllowedKeysAndZeroElsewhere) {
  const Problem p = awkward_problem(1);
  Buffer probs({p.T, p.Hq, p.N});
  attention_probabilities(p.inputs(), probs.view);
  for (std::int64_t t = 0; t < p.T; ++t) {
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      double sum = 0.0;
      for (std::int64_t s = 0; s < p.N; ++s) {
        const double value = probs.at(static_cast<std::size_t>((t * p.Hq + h) * p.N + s));
        if (s < allowed_of(p, t)) {
          EXPECT_GT(value, 0.0);
          sum += value;
        } else {
          EXPECT_EQ(value, 0.0) << "t=" << t << " h=" << h << " s=" << s;
        }
      }
      EXPECT_NEAR(sum, 1.0, 1e-13);
    }
  }
}

TEST(AttentionProbabilities, LogitsAddEachKeysProductsInOrder) {
  // The reference scores several keys side by side; each key's dot product must still be the sequential double
  // sum over d, so the log-sum-exp equals the textbook loop's exactly (37 keys: whole groups of 8 and a rest).
  const Problem p = awkward_problem(12);
  Buffer out({p.T, p.Hq, p.Dv});
  Buffer lse({p.T, p.Hq});
  full_attention(p.inputs(), out.view, lse.view);
  for (std::int64_t t = 0; t < p.T; ++t) {
    for (std::int64_t h = 0; h < p.Hq; ++h) {
      EXPECT_EQ(lse.at(static_cast<std::size_t>(t * p.Hq + h)), naive_full_lse(p, t, h)) << "t=" << t << " h=" << h;
    }
  }
}

TEST(ExactAttention, EqualsTheThreeSeparateReferencesBitForBit) {
  // The awkward problem (5 tokens, 37 keys), and one of several token tiles (19 tokens) and key blocks (300 keys)
  // with positions inside and beyond the keys.
  std::vector<std::int32_t> spread(19);
  for (std::size_t t = 0; t < spread.size(); ++t) spread[t] = static_cast<std::int32_t>((t * 37) % 331);
  const Problem problems[] = {awkward_problem(13), make_problem(15, 19, 300, 6, 2, 13, 7, spread)};
  for (const Granularity granularity : kGranularities) {
    for (const bool with_v : {true, false}) {
     for (const Problem& original : problems) {
      Problem p = original;
      if (!with_v) p.Dv = 0;
      const std::int64_t groups = group_count(granularity, p.Hq, p.Hkv);
      Buffer probs({p.T, p.Hq, p.N}), pbar({p.T, groups, p.N}), out({p.T, p.Hq, std::max<std::int64_t>(p.Dv, 1)});
      exact_attention(p.inputs(), granularity, probs.view, pbar.view, with_v ? out.view : TensorView());
      Buffer want_probs({p.T, p.Hq, p.N}), want_pbar({p.T, groups, p.N}), want_out({p.T, p.Hq, std::max<std::int64_t>(p.Dv, 1)});
      attention_probabilities(p.inputs(), want_probs.view);
      group_probabilities(p.inputs(), granularity, want_pbar.view);
      if (with_v) full_attention(p.inputs(), want_out.view);
      const std::string what = std::string(granularity_name(granularity)) + (with_v ? " with v" : " without v") +
                               " T=" + std::to_string(p.T);
      // Outputs with gaps between rows take the plain loops (exact_attention and group_probabilities tile only
      // contiguous fp64 outputs): the same values again.
      const std::int64_t Dv1 = std::max<std::int64_t>(p.Dv, 1);
      std::vector<double> wide_p(static_cast<std::size_t>(p.T * p.Hq * (p.N + 1)), kSentinel);
      std::vector<double> wide_pbar(static_cast<std::size_t>(p.T * groups * (p.N + 1)), kSentinel);
      std::vector<double> wide_out(static_cast<std::size_t>(p.T * p.Hq * (Dv1 + 1)), kSentinel);
      const std::int64_t p_shape[3] = {p.T, p.Hq, p.N}, p_strides[3] = {p.Hq * (p.N + 1), p.N + 1, 1};
      const std::int64_t g_shape[3] = {p.T, groups, p.N}, g_strides[3] = {groups * (p.N + 1), p.N + 1, 1};
      const std::int64_t o_shape[3] = {p.T, p.Hq, Dv1}, o_strides[3] = {p.Hq * (Dv1 + 1), Dv1 + 1, 1};
      exact_attention(p.inputs(), granularity, TensorView(wide_p.data(), DType::fp64, p_shape, p_strides, Device::cpu(), false),
                      TensorView(wide_pbar.data(), DType::fp64, g_shape, g_strides, Device::cpu(), false),
                      with_v ? TensorView(wide_out.data(), DType::fp64, o_shape, o_strides, Device::cpu(), false)
                             : TensorView());
      std::vector<double> plain_pbar(static_cast<std::size_t>(p.T * groups * (p.N + 1)), kSentinel);
      group_probabilities(p.inputs(), granularity,
                          TensorView(plain_pbar.data(), DType::fp64, g_shape, g_strides, Device::cpu(), false));
      for (std::int64_t r = 0; r < p.T * p.Hq; ++r) {
        for (std::int64_t s = 0; s < p.N; ++s) {
          ASSERT_EQ(probs.at(static_cast<std::size_t>(r * p.N + s)), wide_p[static_cast<std::size_t>(r * (p.N + 1) + s)])
              << what << " plain p " << r << " " << s;
        }
        for (std::int64_t d = 0; with_v && d < p.Dv; ++d) {
          ASSERT_EQ(out.at(static_cast<std::size_t>(r * p.Dv + d)), wide_out[static_cast<std::size_t>(r * (Dv1 + 1) + d)])
              << what << " plain out " << r << " " << d;
        }
      }
      for (std::int64_t r = 0; r < p.T * groups; ++r) {
        for (std::int64_t s = 0; s < p.N; ++s) {
          ASSERT_EQ(pbar.at(static_cast<std::size_t>(r * p.N + s)), wide_pbar[static_cast<std::size_t>(r * (p.N + 1) + s)])
              << what << " plain pbar " << r << " " << s;
          ASSERT_EQ(pbar.at(static_cast<std::size_t>(r * p.N + s)), plain_pbar[static_cast<std::size_t>(r * (p.N + 1) + s)])
              << what << " plain group_probabilities " << r << " " << s;
        }
      }
      for (std::size_t i = 0; i < want_probs.f64.size(); ++i) ASSERT_EQ(probs.at(i), want_probs.at(i)) << what << " p " << i;
      for (std::size_t i = 0; i < want_pbar.f64.size(); ++i) ASSERT_EQ(pbar.at(i), want_pbar.at(i)) << what << " pbar " << i;
      // Without v, out is left alone.
      for (std::size_t i = 0; i < want_out.f64.size(); ++i) ASSERT_EQ(out.at(i), want_out.at(i)) << what << " out " << i;
     }
    }
  }
  const Problem p = awkward_problem(14);
  Buffer probs({p.T, p.Hq, p.N}), pbar({p.T, p.Hkv, p.N}), wrong({p.T, p.Hq, p.N});
  try {
    exact_attention(p.inputs(), Granularity::per_kv_head, probs.view, wrong.view, TensorView());
    FAIL() << "no error for a pbar of the wrong shape";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pbar"), std::string::npos) << e.what();
  }
}

TEST(AttentionProbabilities, StableForHugeLogits) {
  Problem p = make_problem(2, 2, 9, 2, 1, 4, 3, {8, 5});
  for (float& x : p.q) x *= 1000.0f;  // logits in the thousands: a naive exp overflows
  Buffer probs({p.T, p.Hq, p.N});
  attention_probabilities(p.inputs(), probs.view);
  const std::vector<double> expected = naive_probabilities(p);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    ASSERT_TRUE(std::isfinite(probs.at(i)));
    EXPECT_NEAR(probs.at(i), expected[i], 1e-12);
  }
}

// Two queries at positions 2 and 1, one head, N = 3, D = Dv = 2, scale 1:
// q = [1, 0]; keys [0, 0], [1, 0], [2, 0] give logits 0, 1, 2; values [1, 0], [0, 1], [1, 1].
TEST(ReferenceAttention, HandComputedTinyCase) {
  Problem p;
  p.T = 2, p.N = 3, p.Hq = 1, p.Hkv = 1, p.D = 2, p.Dv = 2;
  p.q = {1, 0, 1, 0};
  p.k = {0, 0, 1, 0, 2, 0};
  p.v = {1, 0, 0, 1, 1, 1};
  p.positions = {2, 1};
  p.scale = 1.0;
  const double e = std::exp(1.0), e2 = std::exp(2.0);
  const double z0 = 1.0 + e + e2, z1 = 1.0 + e;

  Buffer probs({2, 1, 3});
  attention_probabilities(p.inputs(), probs.view);
  const double expected_probs[] = {1 / z0, e / z0, e2 / z0, 1 / z1, e / z1, 0.0};
  for (std::size_t i = 0; i < 6; ++i) EXPECT_NEAR(probs.at(i), expected_probs[i], 1e-15) << i;

  Buffer out({2, 1, 2});
  Buffer lse({2, 1});
  full_attention(p.inputs(), out.view, lse.view);
  EXPECT_NEAR(out.at(0), (1 + e2) / z0, 1e-15);
  EXPECT_NEAR(out.at(1), (e + e2) / z0, 1e-15);
  EXPECT_NEAR(out.at(2), 1 / z1, 1e-15);
  EXPECT_NEAR(out.at(3), e / z1, 1e-15);
  EXPECT_NEAR(lse.at(0), std::log(z0), 1e-15);
  EXPECT_NEAR(lse.at(1), std::log(z1), 1e-15);

  // Query 0 restricted to keys {0, 2}; query 1 to nothing (zeros and lse = -inf).
  const std::vector<std::int32_t> selection = {2, 0, -1, -1};
  Buffer sparse_out({2, 1, 2}, DType::fp32);
  Buffer sparse_lse({2, 1}, DType::fp32);
  sparse_attention_reference(p.inputs(), TensorView(selection.data(), DType::int32, {2, 1, 2}),
                             Granularity::per_head, sparse_out.view, sparse_lse.view);
  EXPECT_NEAR(sparse_out.at(0), 1.0, 1e-7);
  EXPECT_NEAR(sparse_out.at(1), e2 / (1 + e2), 1e-7);
  EXPECT_EQ(sparse_out.at(2), 0.0);
  EXPECT_EQ(sparse_out.at(3), 0.0);
  EXPECT_NEAR(sparse_lse.at(0), std::log(1 + e2), 1e-6);
  EXPECT_EQ(sparse_lse.at(1), -std::numeric_limits<double>::infinity());

  // Scale 0 means 1/sqrt(D): logits 0, 1/sqrt(2), 2/sqrt(2).
  p.scale = 0.0;
  attention_probabilities(p.inputs(), probs.view);
  const double a = std::exp(1 / std::sqrt(2.0)), b = std::exp(2 / std::sqrt(2.0));
  EXPECT_NEAR(probs.at(0), 1 / (1 + a + b), 1e-15);
  EXPECT_NEAR(probs.at(2), b / (1 + a + b), 1e-15);
}

// MHA, GQA and MQA: every head reads the key head h / g, checked against loops that walk groups instead.
TEST(ReferenceAttention, HeadMappingMatchesNaiveLoopForMhaGqaMqa) {
  for (const std::int64_t kv_heads : {4, 2, 1}) {
    SCOPED_TRACE("Hkv = " + std::to_string(kv_heads));
    const Problem p = make_problem(10 + static_cast<std::uint64_t>(kv_heads), 3, 11, 4, kv_heads, 5, 6, {10, 4, 7});
    Buffer probs({p.T, p.Hq, p.N});
    attention_probabilities(p.inputs(), probs.view);
    const std::vector<double> expected = naive_probabilities(p);
    for (std::size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(probs.at(i), expected[i], 1e-13) << i;

    Buffer out({p.T, p.Hq, p.Dv});
    Buffer lse({p.T, p.Hq});
    full_attention(p.inputs(), out.view, lse.view);
    for (std::int64_t t = 0; t < p.T; ++t) {
      for (std::int64_t h = 0; h < p.Hq; ++h) {
        std::vector<std::int64_t> keys;
        for (std::int64_t s = 0; s < allowed_of(p, t); ++s) keys.push_back(s);
        std::vector<double> o;
        double expected_lse = 0.0;
        naive_attention_over(p, expected, t, h, keys, o, expected_lse);
        for (std::int64_t d = 0; d < p.Dv; ++d) {
          EXPECT_NEAR(out.at(static_cast<std::size_t>((t * p.Hq + h) * p.Dv + d)), o[static_cast<std::size_t>(d)],
                      1e-12);
        }
        EXPECT_NEAR(lse.at(static_cast<std::size_t>(t * p.Hq + h)), expected_lse, 1e-12);
      }
    }
  }
}

TEST(GroupProbabilities, EqualMeanOfHeadProbabilities) {
  const Problem p = awkward_problem(3);
  Buffer probs({p.T, p.Hq, p.N});
  attention_probabilities(p.inputs(), probs.view);
  for (const Granularity granularity : kGranularities) {
    SCOPED_TRACE(std::string(granularity_name(granularity)));
    const std::int64_t groups = naive_group_count(p, granularity);
    Buffer pbar({p.T, groups, p.N});
    group_probabilities(p.inputs(), granularity, pbar.view);
    for (std::int64_t t = 0; t < p.T; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const std::vector<std::int64_t> heads = naive_heads_of_group(p, granularity, g);
        double sum = 0.0;
        for (std::int64_t s = 0; s < p.N; ++s) {
          double mean = 0.0;
          for (const std::int64_t h : heads) mean += probs.at(static_cast<std::size_t>((t * p.Hq + h) * p.N + s));
          mean /= static_cast<double>(heads.size());
          const double value = pbar.at(static_cast<std::size_t>((t * groups + g) * p.N + s));
          EXPECT_NEAR(value, mean, 1e-15);
          if (s >= allowed_of(p, t)) {
            EXPECT_EQ(value, 0.0);
          }
          sum += value;
        }
        EXPECT_NEAR(sum, 1.0, 1e-13);
      }
    }
  }
}

// ---- sparse attention ------------------------------------------------------------------------------------

TEST(SparseAttentionReference, AllAllowedKeysEqualsFullAttention) {
  const Problem p = awkward_problem(4);
  Buffer full_out({p.T, p.Hq, p.Dv});
  Buffer full_lse({p.T, p.Hq});
  full_attention(p.inputs(), full_out.view, full_lse.view);
  for (const Granularity granularity : kGranularities) {
    SCOPED_TRACE(std::string(granularity_name(granularity)));
    const std::int64_t groups = naive_group_count(p, granularity);
    const std::vector<std::int32_t> selection = all_allowed_selection(p, groups, 5);
    Buffer out({p.T, p.Hq, p.Dv});
    Buffer lse({p.T, p.Hq});
    sparse_attention_reference(p.inputs(), TensorView(selection.data(), DType::int32, {p.T, groups, p.N}),
                               granularity, out.view, lse.view);
    for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out.at(i), full_out.at(i), 1e-12) << i;
    for (std::size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse.at(i), full_lse.at(i), 1e-12) << i;
  }
}

TEST(SparseAttentionReference, SubsetEqualsNaiveRenormalisedAttention) {
  const Problem p = awkward_problem(6);
  const std::vector<double> probs = naive_probabilities(p);
  for (const Granularity granularity : kGranularities) {
    for (const DType dtype : {DType::fp64, DType::fp32}) {
      SCOPED_TRACE(std::string(granularity_name(granularity)) + " " + std::string(dtype_name(dtype)));
      const std::int64_t groups = naive_group_count(p, granularity);
      const std::int64_t width = 9;
      RandomStream rng(7, static_cast<std::uint64_t>(groups));
      std::vector<std::int32_t> selection(static_cast<std::size_t>(p.T * groups * width), -1);
      std::vector<std::vector<std::int64_t>> chosen(static_cast<std::size_t>(p.T * groups));
      for (std::int64_t t = 0; t < p.T; ++t) {
        for (std::int64_t g = 0; g < groups; ++g) {
          std::vector<std::int32_t> keys;
          for (std::int64_t s = 0; s < allowed_of(p, t); ++s) keys.push_back(static_cast<std::int32_t>(s));
          rng.shuffle(std::span<std::int32_t>(keys));
          // Row (0, 0) stays empty: zeros and lse = -inf.
          const std::int64_t count =
              (t == 0 && g == 0) ? 0
                                 : 1 + static_cast<std::int64_t>(rng.uniform_int(static_cast<std::uint64_t>(
                                           std::min<std::int64_t>(width, static_cast<std::int64_t>(keys.size())))));
          for (std::int64_t i = 0; i < count; ++i) {
            selection[static_cast<std::size_t>((t * groups + g) * width + i)] = keys[static_cast<std::size_t>(i)];
            chosen[static_cast<std::size_t>(t * groups + g)].push_back(keys[static_cast<std::size_t>(i)]);
          }
        }
      }
      Buffer out({p.T, p.Hq, p.Dv}, dtype);
      Buffer lse({p.T, p.Hq}, dtype);
      sparse_attention_reference(p.inputs(), TensorView(selection.data(), DType::int32, {p.T, groups, width}),
                                 granularity, out.view, lse.view);
      const double tolerance = dtype == DType::fp64 ? 1e-12 : 2e-6;
      for (std::int64_t t = 0; t < p.T; ++t) {
        for (std::int64_t g = 0; g < groups; ++g) {
          for (const std::int64_t h : naive_heads_of_group(p, granularity, g)) {
            std::vector<double> o;
            double expected_lse = 0.0;
            naive_attention_over(p, probs, t, h, chosen[static_cast<std::size_t>(t * groups + g)], o, expected_lse);
            for (std::int64_t d = 0; d < p.Dv; ++d) {
              EXPECT_NEAR(out.at(static_cast<std::size_t>((t * p.Hq + h) * p.Dv + d)), o[static_cast<std::size_t>(d)],
                          tolerance);
            }
            const double got_lse = lse.at(static_cast<std::size_t>(t * p.Hq + h));
            if (std::isinf(expected_lse)) {
              EXPECT_EQ(got_lse, expected_lse);
            } else {
              EXPECT_NEAR(got_lse, expected_lse, tolerance * 4);
            }
          }
        }
      }
    }
  }
}

TEST(SparseAttentionReference, WritesStridedOutputsAndSkipsEmptyLse) {
  const Problem p = awkward_problem(8);
  Buffer expected({p.T, p.Hq, p.Dv});
  full_attention(p.inputs(), expected.view);
  // out lives in every other float of a wider buffer: [T, Hq, Dv] with strides (2 Hq Dv, 2 Dv, 2).
  std::vector<float> wide(static_cast<std::size_t>(2 * p.T * p.Hq * p.Dv), static_cast<float>(kSentinel));
  const std::int64_t shape[] = {p.T, p.Hq, p.Dv};
  const std::int64_t strides[] = {2 * p.Hq * p.Dv, 2 * p.Dv, 2};
  const TensorView strided(wide.data(), DType::fp32, shape, strides, Device::cpu(), false);
  const std::vector<std::int32_t> selection = all_allowed_selection(p, 1, 9);
  sparse_attention_reference(p.inputs(), TensorView(selection.data(), DType::int32, {p.T, 1, p.N}),
                             Granularity::per_token, strided);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(wide[2 * i], expected.at(i), 1e-5) << i;
    EXPECT_EQ(wide[2 * i + 1], static_cast<float>(kSentinel)) << i;
  }
}

// ---- low-precision inputs --------------------------------------------------------------------------------

// Encoders written here for values exactly representable in the format (normal numbers with few mantissa
// bits), so the test does not lean on the library's own conversions.
std::uint16_t exact_fp16_bits(float value) {
  if (value == 0.0f) return 0;
  const std::uint16_t sign = value < 0 ? 0x8000 : 0;
  const double magnitude = std::fabs(static_cast<double>(value));
  const int exponent = static_cast<int>(std::floor(std::log2(magnitude)));
  const double mantissa = (magnitude / std::ldexp(1.0, exponent) - 1.0) * 1024.0;
  EXPECT_EQ(mantissa, std::floor(mantissa));
  EXPECT_GE(exponent, -14);
  return static_cast<std::uint16_t>(sign | ((exponent + 15) << 10) | static_cast<int>(mantissa));
}

std::uint16_t exact_bf16_bits(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  EXPECT_EQ(bits & 0xFFFFu, 0u);
  return static_cast<std::uint16_t>(bits >> 16);
}

TEST(ReferenceAttention, ReadsFp16AndBf16Inputs) {
  Problem p = awkward_problem(11);
  RandomStream rng(12);
  // Multiples of 1/16 in [-2, 2]: exact in fp16 and bf16.
  for (auto* values : {&p.q, &p.k, &p.v}) {
    for (float& x : *values) x = static_cast<float>(static_cast<int>(rng.uniform_int(65)) - 32) / 16.0f;
  }
  Buffer expected_out({p.T, p.Hq, p.Dv});
  Buffer expected_probs({p.T, p.Hq, p.N});
  full_attention(p.inputs(), expected_out.view);
  attention_probabilities(p.inputs(), expected_probs.view);

  const auto encode = [](const std::vector<float>& values, DType dtype) {
    std::vector<std::uint16_t> bits;
    for (const float x : values) bits.push_back(dtype == DType::fp16 ? exact_fp16_bits(x) : exact_bf16_bits(x));
    return bits;
  };
  for (const DType q_dtype : {DType::fp16, DType::bf16}) {
    const DType kv_dtype = q_dtype == DType::fp16 ? DType::bf16 : DType::fp16;
    SCOPED_TRACE("q " + std::string(dtype_name(q_dtype)) + ", k and v " + std::string(dtype_name(kv_dtype)));
    const std::vector<std::uint16_t> q = encode(p.q, q_dtype), k = encode(p.k, kv_dtype), v = encode(p.v, kv_dtype);
    AttentionInputs in = p.inputs();
    in.q = TensorView(q.data(), q_dtype, {p.T, p.Hq, p.D});
    in.k = TensorView(k.data(), kv_dtype, {p.N, p.Hkv, p.D});
    in.v = TensorView(v.data(), kv_dtype, {p.N, p.Hkv, p.Dv});
    Buffer out({p.T, p.Hq, p.Dv});
    Buffer probs({p.T, p.Hq, p.N});
    full_attention(in, out.view);
    attention_probabilities(in, probs.view);
    for (std::size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out.at(i), expected_out.at(i)) << i;
    for (std::size_t i = 0; i < probs.size(); ++i) EXPECT_EQ(probs.at(i), expected_probs.at(i)) << i;
  }
}

// ---- bad input -------------------------------------------------------------------------------------------

// Each case breaks one argument of a valid call; all four functions must name it and leave outputs untouched.
struct BadInputCase {
  std::string name;
  std::string argument;
  std::function<void(AttentionInputs&)> mutate;
};

class ReferenceBadInput : public ::testing::Test {
 protected:
  Problem p = make_problem(20, 3, 8, 4, 2, 5, 3, {7, 2, 4});
  std::vector<float> spare = std::vector<float>(1000, 0.5f);
  std::vector<std::int32_t> negative_positions = {7, -1, 4};
  std::vector<float> float_positions = {7, 2, 4};

  std::vector<BadInputCase> input_cases() {
    const float* data = spare.data();
    return {
        {"q rank 2", "q", [=, this](AttentionInputs& in) { in.q = TensorView(data, DType::fp32, {p.T, p.Hq * p.D}); }},
        {"q empty", "q", [](AttentionInputs& in) { in.q = TensorView(); }},
        {"q int8", "q", [=, this](AttentionInputs& in) { in.q = TensorView(data, DType::int8, {p.T, p.Hq, p.D}); }},
        {"q fp64", "q", [=, this](AttentionInputs& in) { in.q = TensorView(data, DType::fp64, {p.T, p.Hq, p.D}); }},
        {"q on cuda", "q",
         [=, this](AttentionInputs& in) { in.q = TensorView(data, DType::fp32, {p.T, p.Hq, p.D}, Device::cuda()); }},
        {"k rank 4", "k",
         [=, this](AttentionInputs& in) { in.k = TensorView(data, DType::fp32, {p.N, p.Hkv, p.D, 1}); }},
        {"k head dim mismatch", "k",
         [=, this](AttentionInputs& in) { in.k = TensorView(data, DType::fp32, {p.N, p.Hkv, p.D + 1}); }},
        {"Hq % Hkv != 0", "k", [=, this](AttentionInputs& in) { in.k = TensorView(data, DType::fp32, {p.N, 3, p.D}); }},
        {"no keys", "k", [=, this](AttentionInputs& in) { in.k = TensorView(data, DType::fp32, {0, p.Hkv, p.D}); }},
        {"v rank 2", "v", [=, this](AttentionInputs& in) { in.v = TensorView(data, DType::fp32, {p.N, p.Hkv}); }},
        {"v wrong N", "v",
         [=, this](AttentionInputs& in) { in.v = TensorView(data, DType::fp32, {p.N + 1, p.Hkv, p.Dv}); }},
        {"v int32", "v", [=, this](AttentionInputs& in) { in.v = TensorView(data, DType::int32, {p.N, p.Hkv, p.Dv}); }},
        {"positions wrong length", "positions",
         [=, this](AttentionInputs& in) { in.positions = TensorView(negative_positions.data(), DType::int32, {2}); }},
        {"positions fp32", "positions",
         [=, this](AttentionInputs& in) { in.positions = TensorView(float_positions.data(), DType::fp32, {p.T}); }},
        {"negative position", "positions",
         [=, this](AttentionInputs& in) { in.positions = TensorView(negative_positions.data(), DType::int32, {p.T}); }},
        {"NaN scale", "scale", [](AttentionInputs& in) { in.scale = std::numeric_limits<double>::quiet_NaN(); }},
        {"negative scale", "scale", [](AttentionInputs& in) { in.scale = -1.0; }},
    };
  }
  std::vector<std::int32_t> full_selection() const { return all_allowed_selection(p, p.Hkv, 21); }
};

TEST_F(ReferenceBadInput, AttentionProbabilitiesNamesTheArgumentAndWritesNothing) {
  for (const BadInputCase& c : input_cases()) {
    if (c.argument == "v") continue;  // covered by GivenVIsCheckedEvenWhereNotNeeded
    SCOPED_TRACE(c.name);
    AttentionInputs in = p.inputs();
    c.mutate(in);
    Buffer probs({p.T, p.Hq, p.N});
    expect_error_naming([&] { attention_probabilities(in, probs.view); }, "attention_probabilities", c.argument);
    EXPECT_TRUE(probs.untouched());
  }
  Buffer probs({p.T, p.Hq, p.N});
  expect_error_naming([&] { attention_probabilities(p.inputs(), probs.read_only()); }, "attention_probabilities",
                      "probabilities");
  Buffer wrong_shape({p.T, p.Hq, p.N + 1});
  expect_error_naming([&] { attention_probabilities(p.inputs(), wrong_shape.view); }, "attention_probabilities",
                      "probabilities");
  Buffer fp32({p.T, p.Hq, p.N}, DType::fp32);
  expect_error_naming([&] { attention_probabilities(p.inputs(), fp32.view); }, "attention_probabilities",
                      "probabilities");
  EXPECT_TRUE(probs.untouched() && wrong_shape.untouched() && fp32.untouched());
}

TEST_F(ReferenceBadInput, GivenVIsCheckedEvenWhereNotNeeded) {
  for (const BadInputCase& c : input_cases()) {
    if (c.argument != "v") continue;
    SCOPED_TRACE(c.name);
    AttentionInputs in = p.inputs();
    c.mutate(in);
    Buffer probs({p.T, p.Hq, p.N});
    expect_error_naming([&] { attention_probabilities(in, probs.view); }, "attention_probabilities", "v");
    EXPECT_TRUE(probs.untouched());
  }
}

TEST_F(ReferenceBadInput, GroupProbabilitiesNamesTheArgumentAndWritesNothing) {
  for (const BadInputCase& c : input_cases()) {
    SCOPED_TRACE(c.name);
    AttentionInputs in = p.inputs();
    c.mutate(in);
    Buffer pbar({p.T, p.Hkv, p.N});
    expect_error_naming([&] { group_probabilities(in, Granularity::per_kv_head, pbar.view); }, "group_probabilities",
                        c.argument);
    EXPECT_TRUE(pbar.untouched());
  }
  Buffer pbar({p.T, p.Hkv, p.N});
  expect_error_naming([&] { group_probabilities(p.inputs(), Granularity::per_kv_head, pbar.read_only()); },
                      "group_probabilities", "pbar");
  // per_head needs G = Hq groups, not Hkv.
  expect_error_naming([&] { group_probabilities(p.inputs(), Granularity::per_head, pbar.view); },
                      "group_probabilities", "pbar");
  EXPECT_TRUE(pbar.untouched());
}

TEST_F(ReferenceBadInput, FullAttentionNamesTheArgumentAndWritesNothing) {
  auto cases = input_cases();
  cases.push_back({"v missing", "v", [](AttentionInputs& in) { in.v = TensorView(); }});
  for (const BadInputCase& c : cases) {
    SCOPED_TRACE(c.name);
    AttentionInputs in = p.inputs();
    c.mutate(in);
    Buffer out({p.T, p.Hq, p.Dv});
    Buffer lse({p.T, p.Hq});
    expect_error_naming([&] { full_attention(in, out.view, lse.view); }, "full_attention", c.argument);
    EXPECT_TRUE(out.untouched() && lse.untouched());
  }
  Buffer out({p.T, p.Hq, p.Dv});
  Buffer lse({p.T, p.Hq});
  expect_error_naming([&] { full_attention(p.inputs(), out.read_only(), lse.view); }, "full_attention", "out");
  Buffer out_int({p.T, p.Hq, p.Dv}, DType::int32);
  expect_error_naming([&] { full_attention(p.inputs(), out_int.view, lse.view); }, "full_attention", "out");
  Buffer out_wide({p.T, p.Hq, p.Dv + 1});
  expect_error_naming([&] { full_attention(p.inputs(), out_wide.view, lse.view); }, "full_attention", "out");
  // A bad lse leaves out untouched too: every check runs before the first write.
  expect_error_naming([&] { full_attention(p.inputs(), out.view, lse.read_only()); }, "full_attention", "lse");
  Buffer lse_wrong({p.T, p.Hq, 1});
  expect_error_naming([&] { full_attention(p.inputs(), out.view, lse_wrong.view); }, "full_attention", "lse");
  EXPECT_TRUE(out.untouched() && lse.untouched() && lse_wrong.untouched());
}

TEST_F(ReferenceBadInput, SparseAttentionNamesTheArgumentAndWritesNothing) {
  const std::vector<std::int32_t> good = full_selection();
  const TensorView good_view(good.data(), DType::int32, {p.T, p.Hkv, p.N});
  auto cases = input_cases();
  cases.push_back({"v missing", "v", [](AttentionInputs& in) { in.v = TensorView(); }});
  for (const BadInputCase& c : cases) {
    SCOPED_TRACE(c.name);
    AttentionInputs in = p.inputs();
    c.mutate(in);
    Buffer out({p.T, p.Hq, p.Dv});
    Buffer lse({p.T, p.Hq});
    expect_error_naming([&] { sparse_attention_reference(in, good_view, Granularity::per_kv_head, out.view, lse.view); },
                        "sparse_attention_reference", c.argument);
    EXPECT_TRUE(out.untouched() && lse.untouched());
  }

  // Broken selections. Query 1 sits at position 2, so it may read keys 0, 1, 2 only.
  const auto broken = [&](std::int64_t t, std::int64_t g, std::vector<std::int32_t> row) {
    std::vector<std::int32_t> sel = good;
    std::fill(sel.begin() + (t * p.Hkv + g) * p.N, sel.begin() + (t * p.Hkv + g + 1) * p.N, -1);
    std::copy(row.begin(), row.end(), sel.begin() + (t * p.Hkv + g) * p.N);
    return sel;
  };
  const std::vector<std::pair<std::string, std::vector<std::int32_t>>> selections = {
      {"out of range", broken(0, 1, {0, 8})},
      {"negative", broken(0, 0, {3, -2})},
      {"duplicated", broken(2, 1, {1, 3, 1})},
      {"padding in the middle", broken(0, 0, {1, -1, 2})},
      {"not allowed causally", broken(1, 0, {0, 3})},
  };
  for (const auto& [name, sel] : selections) {
    SCOPED_TRACE(name);
    Buffer out({p.T, p.Hq, p.Dv});
    Buffer lse({p.T, p.Hq});
    expect_error_naming(
        [&, &sel = sel] {  // clang 14 cannot capture a structured binding itself
          sparse_attention_reference(p.inputs(), TensorView(sel.data(), DType::int32, {p.T, p.Hkv, p.N}),
                                     Granularity::per_kv_head, out.view, lse.view);
        },
        "sparse_attention_reference", "selection");
    EXPECT_TRUE(out.untouched() && lse.untouched());
  }
  Buffer out({p.T, p.Hq, p.Dv});
  Buffer lse({p.T, p.Hq});
  // Group count of the selection disagrees with the granularity.
  expect_error_naming(
      [&] { sparse_attention_reference(p.inputs(), good_view, Granularity::per_token, out.view, lse.view); },
      "sparse_attention_reference", "selection");
  const std::vector<float> float_selection(good.begin(), good.end());
  expect_error_naming(
      [&] {
        sparse_attention_reference(p.inputs(), TensorView(float_selection.data(), DType::fp32, {p.T, p.Hkv, p.N}),
                                   Granularity::per_kv_head, out.view, lse.view);
      },
      "sparse_attention_reference", "selection");
  expect_error_naming(
      [&] { sparse_attention_reference(p.inputs(), good_view, Granularity::per_kv_head, out.read_only(), lse.view); },
      "sparse_attention_reference", "out");
  expect_error_naming(
      [&] { sparse_attention_reference(p.inputs(), good_view, Granularity::per_kv_head, out.view, lse.read_only()); },
      "sparse_attention_reference", "lse");
  EXPECT_TRUE(out.untouched() && lse.untouched());
}

}  // namespace
}  // namespace keysel
