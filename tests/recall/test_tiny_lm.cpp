// The tiny language model (tiny_lm.h): the fast fp32 forward pass against the double reference on a small random
// model written with keysel's safetensors writer (fp32 and fp16), sparse forward passes with selections whose
// outcome is known, weight files that are corrupt or disagree with their config, bits per byte, and the shipped
// model against what PyTorch computed for it (logits, bits per byte of the held-out text, a dump of its layers).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "keysel/core/dtype.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/loaders.h"
#include "keysel/recall/tiny_lm.h"

namespace keysel {
namespace {

namespace fs = std::filesystem;

fs::path temp_path(const std::string& name) {
  return fs::path(::testing::TempDir()) / ("keysel_tiny_lm_" + std::to_string(::getpid()) + "_" + name);
}

template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected keysel::Error containing '" << *parts.begin() << "'";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
  }
}

/// max |a - b| / max |b|.
template <typename A, typename B>
double max_relative_difference(const std::vector<A>& a, const std::vector<B>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// ---- a small random model ------------------------------------------------------------------------------

TinyLmConfig small_config() {
  TinyLmConfig c;
  c.vocab = 256;
  c.d_model = 48;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 12;
  c.ffn_dim = 40;
  c.context = 64;
  c.rope_theta = 10000.0;
  c.norm_eps = 1e-5;
  c.index_heads = 2;
  c.index_dim = 8;
  return c;
}

/// The keysel-tiny-lm/1 layout, written out independently of the loader: name and shape of every tensor.
std::vector<std::pair<std::string, std::vector<std::int64_t>>> layout(const TinyLmConfig& c) {
  const std::int64_t d = c.d_model, D = c.head_dim;
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> out = {
      {"embed", {c.vocab, d}}, {"final_norm", {d}}, {"lm_head", {c.vocab, d}}};
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    out.push_back({p + "attn_norm", {d}});
    out.push_back({p + "wq", {c.heads * D, d}});
    out.push_back({p + "wk", {c.kv_heads * D, d}});
    out.push_back({p + "wv", {c.kv_heads * D, d}});
    out.push_back({p + "wo", {d, c.heads * D}});
    out.push_back({p + "mlp_norm", {d}});
    out.push_back({p + "w_gate", {c.ffn_dim, d}});
    out.push_back({p + "w_up", {c.ffn_dim, d}});
    out.push_back({p + "w_down", {d, c.ffn_dim}});
    if (c.index_heads > 0) {
      out.push_back({p + "index_wq", {c.index_heads * c.index_dim, d}});
      out.push_back({p + "index_wk", {c.index_dim, d}});
      out.push_back({p + "index_ww", {c.index_heads, d}});
    }
  }
  return out;
}

/// Random weights: norms near 1, matrices scaled by 1/sqrt(fan-in) (q and k twice that, for attention that is
/// far from uniform), embeddings of unit size.
SafetensorsFile random_model(const TinyLmConfig& c, DType dtype, std::uint64_t seed) {
  SafetensorsFile file;
  file.metadata["format"] = std::string(kTinyLmFormat);
  file.metadata["config"] = tiny_lm_config_json(c);
  RandomStream random(seed);
  for (const auto& [name, shape] : layout(c)) {
    std::int64_t n = 1;
    for (const std::int64_t e : shape) n *= e;
    std::vector<float> values(static_cast<std::size_t>(n));
    const bool is_norm = shape.size() == 1;
    const bool is_qk = name.ends_with(".wq") || name.ends_with(".wk");
    const double stddev = is_norm           ? 0.2
                          : name == "embed" ? 1.0
                                            : (is_qk ? 2.0 : 1.0) / std::sqrt(static_cast<double>(shape[1]));
    random.fill_normal(std::span<float>(values), is_norm ? 1.0 : 0.0, stddev);
    file.tensors.push_back(LoadedTensor::from_float(name, values, shape, dtype));
  }
  return file;
}

std::vector<std::uint8_t> random_tokens(std::int64_t n, std::uint64_t seed) {
  RandomStream random(seed);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n));
  for (auto& t : out) t = static_cast<std::uint8_t>(random.uniform_int(256));
  return out;
}

/// A model written to a temporary file with keysel's safetensors writer and loaded back.
TinyLm written_and_loaded(const SafetensorsFile& file, const std::string& name) {
  const fs::path path = temp_path(name);
  write_safetensors(path, file.tensors, file.metadata);
  TinyLm model = TinyLm::load(path.string());
  fs::remove(path);
  return model;
}

std::span<const std::uint8_t> prefix(const std::vector<std::uint8_t>& tokens, std::int64_t n) {
  return std::span<const std::uint8_t>(tokens).first(static_cast<std::size_t>(n));
}

/// A selector callback running a keysel Selector over the layer's attention inputs.
TinyLmSparse with_selector(Selector& selector, const SelectionPolicy& policy) {
  TinyLmSparse sparse;
  sparse.granularity = policy.granularity;
  sparse.width = policy.width();
  sparse.select = [&selector, policy](const TinyLmLayer& layer, const TensorView& selection) {
    selector.select(layer.attention, policy, selection);
  };
  return sparse;
}

// Tolerance of the fp32 forward pass against the double reference on the small model (max |diff| / max |ref|):
// fp32 rounding through 2 layers of width 48 stays near 1e-6.
constexpr double kForwardTolerance = 2e-5;

TEST(TinyLmForward, MatchesTheDoubleReferenceOnAwkwardLengths) {
  const TinyLmConfig config = small_config();
  const std::vector<std::uint8_t> tokens = random_tokens(config.context, 11);
  std::vector<float> previous_dtype_logits;
  for (const DType dtype : {DType::fp32, DType::fp16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const TinyLm model = written_and_loaded(random_model(config, dtype, 5), "forward.safetensors");
    EXPECT_EQ(model.config().d_model, config.d_model);
    std::vector<float> longest;
    for (const std::int64_t T : {1, 7, 61}) {
      SCOPED_TRACE("T = " + std::to_string(T));
      const std::vector<float> fast = model.logits(prefix(tokens, T));
      const std::vector<double> reference = tiny_lm_reference_logits(model, prefix(tokens, T));
      ASSERT_EQ(fast.size(), static_cast<std::size_t>(T * config.vocab));
      const double diff = max_relative_difference(fast, reference);
      EXPECT_LE(diff, kForwardTolerance);
      std::cout << "[ tiny_lm ] " << dtype_name(dtype) << " T=" << T << ": fp32 forward vs double reference " << diff
                << "\n";
      longest = fast;
    }
    // Causal: the logits of a prefix are the first rows of the logits of the whole sequence.
    const std::vector<float> head = model.logits(prefix(tokens, 7));
    EXPECT_LE(max_relative_difference(head, std::vector<float>(longest.begin(), longest.begin() + 7 * config.vocab)),
              kForwardTolerance);
    // fp16 weights are the fp32 weights rounded: close but not the same model.
    if (!previous_dtype_logits.empty()) {
      const double change = max_relative_difference(longest, previous_dtype_logits);
      EXPECT_GT(change, 1e-5);
      EXPECT_LT(change, 0.05);
    }
    previous_dtype_logits = longest;
  }
}

TEST(TinyLmForward, ExactSelectorWithAllKeysEqualsFullAttention) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 7));
  const std::vector<std::uint8_t> tokens = random_tokens(53, 3);
  const std::vector<float> full = model.logits(tokens);
  const std::unique_ptr<Selector> exact = make_exact_selector();
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    SCOPED_TRACE(granularity_name(granularity));
    SelectionPolicy policy;
    policy.k = 64;  // >= T: every allowed key
    policy.granularity = granularity;
    const std::vector<float> sparse = model.logits(tokens, with_selector(*exact, policy));
    EXPECT_LE(max_relative_difference(sparse, full), 1e-5);
  }
  // Fewer keys than the queries may read change the result.
  SelectionPolicy policy;
  policy.k = 4;
  const TinyLmSparse sparse = with_selector(*exact, policy);
  const std::vector<float> few = model.logits(tokens, sparse);
  EXPECT_GT(max_relative_difference(few, full), 1e-3);
}

TEST(TinyLmForward, SparseForwardMatchesTheReferenceOnTheSameSelection) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp16, 9));
  const std::vector<std::uint8_t> tokens = random_tokens(61, 4);
  // The random selector reads only positions, so the fast and the reference pass get the same selection.
  const std::unique_ptr<Selector> random = make_random_selector(21);
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    SCOPED_TRACE(granularity_name(granularity));
    SelectionPolicy policy;
    policy.k = 5;
    policy.granularity = granularity;
    const TinyLmSparse sparse = with_selector(*random, policy);
    const std::vector<float> fast = model.logits(tokens, sparse);
    const std::vector<double> reference = tiny_lm_reference_logits(model, tokens, &sparse);
    EXPECT_LE(max_relative_difference(fast, reference), kForwardTolerance);
    EXPECT_GT(max_relative_difference(fast, model.logits(tokens)), 1e-3);
  }
}

TEST(TinyLmForward, OwnKeyOnlyMakesEveryPositionSeeItsTokenAlone) {
  // With only its own key, a token's attention output is its own value row, so no position sees another token:
  // the logits at t are those of the one-token sequence tokens[t].
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 13));
  const std::vector<std::uint8_t> tokens = random_tokens(29, 8);
  TinyLmSparse sparse;
  sparse.granularity = Granularity::per_head;
  sparse.width = 3;  // the tail of each row stays -1
  std::int64_t calls = 0;
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    EXPECT_EQ(layer.layer, calls++);
    EXPECT_EQ(selection.size(1), config.heads);
    for (std::int64_t t = 0; t < selection.size(0); ++t) {
      for (std::int64_t g = 0; g < selection.size(1); ++g) {
        for (std::int64_t i = 0; i < selection.size(2); ++i) {
          EXPECT_EQ(selection.load({t, g, i}), -1.0);  // arrives poisoned
        }
        selection.mutable_data<std::int32_t>()[(t * selection.size(1) + g) * selection.size(2)] =
            static_cast<std::int32_t>(t);
      }
    }
  };
  const std::vector<float> logits = model.logits(tokens, sparse);
  EXPECT_EQ(calls, config.layers);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const std::vector<float> alone = model.logits(std::span<const std::uint8_t>(&tokens[t], 1));
    const std::vector<float> row(logits.begin() + static_cast<std::ptrdiff_t>(t * 256),
                                 logits.begin() + static_cast<std::ptrdiff_t>((t + 1) * 256));
    EXPECT_LE(max_relative_difference(row, alone), 1e-5) << "t = " << t;
  }
}

TEST(TinyLmForward, TraceHoldsWhatTheSelectorSees) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 17));
  const std::vector<std::uint8_t> tokens = random_tokens(23, 5);
  const TinyLmTrace trace = model.trace(tokens);
  EXPECT_EQ(trace.logits, model.logits(tokens));
  ASSERT_EQ(trace.layers.size(), static_cast<std::size_t>(config.layers));
  // Layer 0 sees the same inputs whatever attention ran before (none did); the selector's views agree with the
  // trace element by element.
  TinyLmSparse sparse;
  sparse.width = 1;
  bool checked = false;
  sparse.select = [&](const TinyLmLayer& layer, const TensorView& selection) {
    for (std::int64_t t = 0; t < selection.size(0); ++t) {
      for (std::int64_t g = 0; g < selection.size(1); ++g) {
        selection.mutable_data<std::int32_t>()[t * selection.size(1) + g] = static_cast<std::int32_t>(t);
      }
    }
    if (layer.layer != 0) return;
    const TinyLmLayer recorded = trace.layers[0].view(config);
    for (const auto& [seen, kept] :
         {std::pair{layer.attention.q, recorded.attention.q}, std::pair{layer.attention.k, recorded.attention.k},
          std::pair{layer.attention.v, recorded.attention.v}, std::pair{layer.index_q, recorded.index_q},
          std::pair{layer.index_k, recorded.index_k}, std::pair{layer.index_w, recorded.index_w}}) {
      ASSERT_EQ(seen.str(), kept.str());
      EXPECT_EQ(to_double_vector(seen), to_double_vector(kept));
    }
    EXPECT_EQ(layer.attention.scale, 1.0 / std::sqrt(12.0));
    EXPECT_EQ(to_double_vector(layer.attention.positions)[22], 22.0);
    checked = true;
  };
  (void)model.logits(tokens, sparse);
  EXPECT_TRUE(checked);
  const TinyLmLayerRecord& r = trace.layers[0];
  EXPECT_EQ(r.q.size(), static_cast<std::size_t>(23 * config.heads * config.head_dim));
  EXPECT_EQ(r.index_q.size(), static_cast<std::size_t>(23 * config.index_heads * config.index_dim));
}

TEST(TinyLmForward, RopeScoresDependOnTheDistanceOnly) {
  // A sequence repeating one token: every position has the same pre-RoPE q and k in layer 0, so after RoPE
  // q[t] . k[s] depends on t - s alone (also for the indexer's qI . kI).
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 19));
  const std::vector<std::uint8_t> tokens(40, 77);
  const TinyLmTrace trace = model.trace(tokens);
  const TinyLmLayerRecord& r = trace.layers[0];
  const std::int64_t D = config.head_dim, DI = config.index_dim, Hq = config.heads, Hkv = config.kv_heads;
  const auto score = [&](std::int64_t t, std::int64_t s, std::int64_t head) {
    double dot = 0;
    for (std::int64_t i = 0; i < D; ++i) {
      dot += static_cast<double>(r.q[static_cast<std::size_t>((t * Hq + head) * D + i)]) *
             r.k[static_cast<std::size_t>((s * Hkv + head / (Hq / Hkv)) * D + i)];
    }
    return dot;
  };
  const auto index_score = [&](std::int64_t t, std::int64_t s, std::int64_t head) {
    double dot = 0;
    for (std::int64_t i = 0; i < DI; ++i) {
      dot += static_cast<double>(r.index_q[static_cast<std::size_t>((t * config.index_heads + head) * DI + i)]) *
             r.index_k[static_cast<std::size_t>(s * DI + i)];
    }
    return dot;
  };
  double largest_change = 0;
  for (std::int64_t head = 0; head < Hq; ++head) {
    EXPECT_NEAR(score(3, 1, head), score(37, 35, head), 1e-4 * (1 + std::abs(score(3, 1, head))));
    EXPECT_NEAR(score(9, 0, head), score(30, 21, head), 1e-4 * (1 + std::abs(score(9, 0, head))));
    largest_change = std::max(largest_change, std::abs(score(3, 3, head) - score(37, 35, head)));
  }
  EXPECT_GT(largest_change, 1e-2);
  for (std::int64_t head = 0; head < config.index_heads; ++head) {
    EXPECT_NEAR(index_score(5, 2, head), index_score(31, 28, head), 1e-4 * (1 + std::abs(index_score(5, 2, head))));
  }
  // The values carry no RoPE: identical at every position.
  for (std::int64_t i = 0; i < Hkv * D; ++i) {
    EXPECT_EQ(r.v[static_cast<std::size_t>(i)], r.v[static_cast<std::size_t>(39 * Hkv * D + i)]);
  }
}

TEST(TinyLmForward, BadArgumentsAndSelectionsAreErrors) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 23));
  const std::vector<std::uint8_t> tokens = random_tokens(12, 6);
  expect_error([&] { (void)model.logits(std::span<const std::uint8_t>()); }, {"tokens", "1 to context = 64"});
  expect_error([&] { (void)model.logits(random_tokens(65, 1)); }, {"tokens", "65"});
  expect_error([&] { (void)TinyLm().logits(tokens); }, {"model", "default-constructed"});
  expect_error([&] { (void)tiny_lm_reference_logits(TinyLm(), tokens); }, {"model"});

  const auto writing = [](std::function<void(std::int64_t t, std::int32_t * row)> fill) {
    TinyLmSparse sparse;
    sparse.width = 3;
    sparse.select = [fill](const TinyLmLayer&, const TensorView& selection) {
      for (std::int64_t t = 0; t < selection.size(0); ++t) {
        for (std::int64_t g = 0; g < selection.size(1); ++g) {
          fill(t, selection.mutable_data<std::int32_t>() + (t * selection.size(1) + g) * selection.size(2));
        }
      }
    };
    return sparse;
  };
  // A key after the query's own position.
  expect_error(
      [&] {
        (void)model.logits(
            tokens, writing([](std::int64_t t, std::int32_t* row) { row[0] = static_cast<std::int32_t>(t + 1); }));
      },
      {"layer 0 selection", "[0, 1)"});
  // A repeated key; a key after -1 padding.
  expect_error(
      [&] { (void)model.logits(tokens, writing([](std::int64_t, std::int32_t* row) { row[0] = row[1] = 0; })); },
      {"layer 0 selection"});
  expect_error([&] { (void)model.logits(tokens, writing([](std::int64_t, std::int32_t* row) { row[2] = 0; })); },
               {"layer 0 selection", "padding"});
  // The reference checks the same way.
  const TinyLmSparse late =
      writing([](std::int64_t t, std::int32_t* row) { row[0] = static_cast<std::int32_t>(t + 1); });
  expect_error([&] { (void)tiny_lm_reference_logits(model, tokens, &late); }, {"layer 0 selection"});
  // A bad selection in the second layer names that layer.
  TinyLmSparse second = writing([](std::int64_t t, std::int32_t* row) { row[0] = static_cast<std::int32_t>(t); });
  const TinyLmSelect good = second.select;
  second.select = [good](const TinyLmLayer& layer, const TensorView& selection) {
    good(layer, selection);
    if (layer.layer == 1) selection.mutable_data<std::int32_t>()[0] = 5;
  };
  expect_error([&] { (void)model.logits(tokens, second); }, {"layer 1 selection"});

  TinyLmSparse empty;
  empty.width = 2;
  expect_error([&] { (void)model.logits(tokens, empty); }, {"sparse.select"});
  TinyLmSparse narrow = writing([](std::int64_t, std::int32_t*) {});
  narrow.width = 0;
  expect_error([&] { (void)model.logits(tokens, narrow); }, {"sparse.width", ">= 1"});
}

// ---- weight files -------------------------------------------------------------------------------------------

TinyLmConfig tiny_config() {
  TinyLmConfig c = small_config();
  c.d_model = 16;
  c.ffn_dim = 8;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 4;
  c.vocab = 256;
  return c;
}

SafetensorsFile without(SafetensorsFile file, const std::string& name) {
  std::erase_if(file.tensors, [&](const LoadedTensor& t) { return t.name == name; });
  return file;
}

LoadedTensor& tensor_of(SafetensorsFile& file, const std::string& name) {
  for (LoadedTensor& t : file.tensors) {
    if (t.name == name) return t;
  }
  throw std::runtime_error("no tensor " + name);
}

// ---- top-k decoding over a full-attention prefill ---------------------------------------------------------

void put(const TensorView& selection, std::int64_t t, std::int64_t g, std::int64_t i, std::int64_t value) {
  selection.mutable_data<std::int32_t>()[(t * selection.size(1) + g) * selection.size(2) + i] =
      static_cast<std::int32_t>(value);
}

/// A selection that depends on positions only (the same in every forward pass): per row and group, every
/// allowed key s with (s * 7 + group * 3 + pos) % 3 != 0, plus the row's own key, up to the width.
void hashed_selection(const TinyLmLayer& layer, const TensorView& selection) {
  const TensorView& positions = layer.attention.positions;
  for (std::int64_t t = 0; t < selection.size(0); ++t) {
    const auto pos = static_cast<std::int64_t>(positions.load({t}));
    for (std::int64_t g = 0; g < selection.size(1); ++g) {
      std::int64_t n = 0;
      for (std::int64_t s = 0; s <= pos && n < selection.size(2); ++s) {
        if ((s * 7 + g * 3 + pos) % 3 != 0 || s == pos) put(selection, t, g, n++, s);
      }
    }
  }
}

/// Every allowed key of every row below `first_sparse`, hashed_selection for the rows at or after it.
TinyLmSparse suffix_sparse(std::int64_t first_sparse, std::int64_t width, Granularity granularity) {
  TinyLmSparse sparse;
  sparse.granularity = granularity;
  sparse.width = width;
  sparse.select = [first_sparse](const TinyLmLayer& layer, const TensorView& selection) {
    hashed_selection(layer, selection);
    const TensorView& positions = layer.attention.positions;
    for (std::int64_t t = 0; t < selection.size(0); ++t) {
      const auto pos = static_cast<std::int64_t>(positions.load({t}));
      if (pos >= first_sparse) continue;
      for (std::int64_t g = 0; g < selection.size(1); ++g) {
        for (std::int64_t i = 0; i < selection.size(2); ++i) {
          put(selection, t, g, i, i <= pos ? i : -1);
        }
      }
    }
  };
  return sparse;
}

std::vector<float> rows_of(const std::vector<float>& logits, const std::vector<std::int64_t>& rows, std::int64_t vocab) {
  std::vector<float> out;
  for (const std::int64_t r : rows) {
    out.insert(out.end(), logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
  }
  return out;
}

TEST(TinyLmDecode, FullAttentionDecodeEqualsTheFullForwardRows) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 17));
  const std::vector<std::uint8_t> tokens = random_tokens(57, 5);
  const TinyLmPrefill prefill = model.prefill(tokens);
  const std::vector<float> full = model.logits(tokens);
  EXPECT_EQ(prefill.logits, full);
  ASSERT_EQ(prefill.k.size(), static_cast<std::size_t>(config.layers));
  const std::vector<std::int64_t> rows = {0, 3, 17, 40, 56};
  const std::vector<float> expected = rows_of(full, rows, config.vocab);
  // Without a selection, and with the exact top-k at k >= the keys any row may read.
  EXPECT_LE(max_relative_difference(model.decode(tokens, prefill, rows), expected), 1e-5);
  const std::unique_ptr<Selector> exact = make_exact_selector();
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    SCOPED_TRACE(granularity_name(granularity));
    SelectionPolicy policy;
    policy.k = 64;
    policy.granularity = granularity;
    const TinyLmSparse sparse = with_selector(*exact, policy);
    EXPECT_LE(max_relative_difference(model.decode(tokens, prefill, rows, &sparse), expected), 1e-5);
    // Fewer keys than the rows may read change the logits of the late rows.
    policy.k = 3;
    const TinyLmSparse few = with_selector(*exact, policy);
    EXPECT_GT(max_relative_difference(model.decode(tokens, prefill, rows, &few), expected), 1e-3);
  }
}

TEST(TinyLmDecode, EveryRowScoredEqualsTheSparseForwardPass) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp16, 19));
  const std::vector<std::uint8_t> tokens = random_tokens(45, 6);
  const TinyLmPrefill prefill = model.prefill(tokens);
  std::vector<std::int64_t> rows(tokens.size());
  std::iota(rows.begin(), rows.end(), 0);
  for (const Granularity granularity : {Granularity::per_head, Granularity::per_kv_head, Granularity::per_token}) {
    SCOPED_TRACE(granularity_name(granularity));
    TinyLmSparse sparse;
    sparse.granularity = granularity;
    sparse.width = 9;
    sparse.select = hashed_selection;
    const std::vector<float> forward = model.logits(tokens, sparse);
    const std::vector<float> decoded = model.decode(tokens, prefill, rows, &sparse);
    EXPECT_LE(max_relative_difference(decoded, forward), 1e-5);
    // The selection matters: the sparse pass is far from full attention.
    EXPECT_GT(max_relative_difference(forward, prefill.logits), 1e-3);
  }
}

TEST(TinyLmDecode, ScoredSuffixEqualsTheSparseForwardWithAFullPrefix) {
  // Rows before the scored ones read every key in both passes; the scored suffix reads the same selection. The
  // decode pass's cache holds the prefill's K/V below the suffix and the suffix rows' own K/V, as the sparse
  // forward pass computes them.
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 23));
  const std::vector<std::uint8_t> tokens = random_tokens(50, 7);
  const TinyLmPrefill prefill = model.prefill(tokens);
  for (const std::int64_t suffix : {1, 4}) {
    SCOPED_TRACE("suffix " + std::to_string(suffix));
    const std::int64_t first = 50 - suffix;
    std::vector<std::int64_t> rows(static_cast<std::size_t>(suffix));
    std::iota(rows.begin(), rows.end(), first);
    const TinyLmSparse sparse = suffix_sparse(first, 50, Granularity::per_kv_head);
    const std::vector<float> forward = rows_of(model.logits(tokens, sparse), rows, config.vocab);
    const std::vector<float> decoded = model.decode(tokens, prefill, rows, &sparse);
    EXPECT_LE(max_relative_difference(decoded, forward), 1e-5);
    EXPECT_GT(max_relative_difference(decoded, rows_of(prefill.logits, rows, config.vocab)), 1e-3);
  }
  // Scored rows that are not a suffix: a later unscored row reads the prefill's K/V, not the sparse rows', so
  // the passes differ (the decode pass is a decoder's, not a forward pass's).
  const std::vector<std::int64_t> rows = {20, 49};
  const TinyLmSparse sparse = suffix_sparse(0, 50, Granularity::per_kv_head);
  const std::vector<float> forward = rows_of(model.logits(tokens, sparse), rows, config.vocab);
  EXPECT_GT(max_relative_difference(model.decode(tokens, prefill, rows, &sparse), forward), 1e-4);
}

TEST(TinyLmDecode, TheCallbackSeesScoredRowsOverTheWholeCache) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 29));
  const std::vector<std::uint8_t> tokens = random_tokens(33, 8);
  const TinyLmPrefill prefill = model.prefill(tokens);
  const TinyLmTrace trace = model.trace(tokens);
  const std::vector<std::int64_t> rows = {31, 32};
  TinyLmSparse sparse = suffix_sparse(0, 40, Granularity::per_token);
  std::int64_t calls = 0;
  sparse.select = [&, inner = sparse.select](const TinyLmLayer& layer, const TensorView& selection) {
    EXPECT_EQ(layer.layer, calls++);
    EXPECT_EQ(layer.attention.q.size(0), 2);
    EXPECT_EQ(layer.attention.k.size(0), 33);
    EXPECT_EQ(layer.index_q.size(0), 2);
    EXPECT_EQ(layer.index_k.size(0), 33);
    EXPECT_EQ(layer.attention.positions.load({1}), 32.0);
    EXPECT_EQ(selection.size(0), 2);
    // Below the scored rows the cache is the full pass's.
    const std::vector<float>& k = trace.layers[static_cast<std::size_t>(layer.layer)].k;
    for (std::int64_t i = 0; i < 31 * config.kv_heads * config.head_dim; ++i) {
      ASSERT_EQ(layer.attention.k.data<float>()[i], k[static_cast<std::size_t>(i)]);
    }
    inner(layer, selection);
  };
  model.decode(tokens, prefill, rows, &sparse);
  EXPECT_EQ(calls, config.layers);
}

TEST(TinyLmDecode, BadArgumentsAreErrors) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp32, 31));
  const std::vector<std::uint8_t> tokens = random_tokens(20, 9);
  const TinyLmPrefill prefill = model.prefill(tokens);
  expect_error([&] { model.decode(tokens, prefill, std::vector<std::int64_t>{3, 3}); }, {"TinyLm::decode", "rows"});
  expect_error([&] { model.decode(tokens, prefill, std::vector<std::int64_t>{5, 2}); }, {"rows", "ascending"});
  expect_error([&] { model.decode(tokens, prefill, std::vector<std::int64_t>{20}); }, {"rows", "[0, T = 20)"});
  expect_error([&] { model.decode(tokens, prefill, std::vector<std::int64_t>{-1}); }, {"rows"});
  expect_error([&] { model.decode(tokens, prefill, std::vector<std::int64_t>{}); }, {"rows", "none"});
  expect_error([&] { model.decode(prefix(tokens, 19), prefill, std::vector<std::int64_t>{1}); }, {"prefill"});
  TinyLmPrefill broken = prefill;
  broken.k[1].pop_back();
  expect_error([&] { model.decode(tokens, broken, std::vector<std::int64_t>{1}); }, {"prefill", "layer 1"});
  TinyLmSparse sparse = suffix_sparse(0, 4, Granularity::per_head);
  sparse.select = [](const TinyLmLayer&, const TensorView& selection) { put(selection, 0, 0, 0, 7); };
  expect_error([&] { model.decode(tokens, prefill, std::vector<std::int64_t>{2, 9}, &sparse); }, {"layer 0"});
}

TEST(TinyLmLoad, MissingMisshapenOrExtraTensorsNameTheTensor) {
  const TinyLmConfig config = tiny_config();
  const SafetensorsFile good = random_model(config, DType::fp16, 1);
  EXPECT_NO_THROW(TinyLm::from_safetensors(good, "good.safetensors"));

  expect_error([&] { TinyLm::from_safetensors(without(good, "layers.1.wk"), "m.safetensors"); },
               {"TinyLm::load", "m.safetensors", "layers.1.wk", "missing"});
  expect_error([&] { TinyLm::from_safetensors(without(good, "lm_head"), "m.safetensors"); }, {"lm_head", "missing"});
  // One of the three indexer tensors alone is missing.
  expect_error([&] { TinyLm::from_safetensors(without(good, "layers.0.index_ww"), "m"); },
               {"layers.0.index_ww", "missing"});

  SafetensorsFile wrong_shape = good;
  const std::vector<float> values(static_cast<std::size_t>(9 * config.d_model), 0.5f);
  tensor_of(wrong_shape, "layers.0.wq") = LoadedTensor::from_float("layers.0.wq", values, {9, config.d_model});
  expect_error([&] { TinyLm::from_safetensors(wrong_shape, "m"); },
               {"layers.0.wq", "expected shape [8, 16]", "[9, 16]"});

  SafetensorsFile transposed = good;
  LoadedTensor& wo = tensor_of(transposed, "layers.1.wo");
  std::swap(wo.shape[0], wo.shape[1]);
  expect_error([&] { TinyLm::from_safetensors(transposed, "m"); }, {"layers.1.wo", "[16, 8]"});

  SafetensorsFile integer = good;
  tensor_of(integer, "final_norm") =
      LoadedTensor::from_int32("final_norm", std::vector<std::int32_t>(16, 1), {config.d_model});
  expect_error([&] { TinyLm::from_safetensors(integer, "m"); }, {"final_norm", "dtype"});

  SafetensorsFile extra = good;
  extra.tensors.push_back(LoadedTensor::from_float("layers.0.bias", std::vector<float>{1}, {1}));
  expect_error([&] { TinyLm::from_safetensors(extra, "m"); }, {"layers.0.bias", "unexpected"});
}

TEST(TinyLmLoad, ConfigDisagreeingWithTheTensorsIsAnError) {
  const TinyLmConfig config = tiny_config();
  const SafetensorsFile good = random_model(config, DType::fp32, 2);
  // The config asks for more layers than the file has.
  SafetensorsFile more = good;
  TinyLmConfig c = config;
  c.layers = 3;
  more.metadata["config"] = tiny_lm_config_json(c);
  expect_error([&] { TinyLm::from_safetensors(more, "m"); }, {"layers.2.attn_norm", "missing", "3 layers"});
  // Fewer layers than the file has.
  SafetensorsFile fewer = good;
  c.layers = 1;
  fewer.metadata["config"] = tiny_lm_config_json(c);
  expect_error([&] { TinyLm::from_safetensors(fewer, "m"); }, {"layers.1.", "unexpected", "1 layers"});
  // No indexer in the config, indexer tensors in the file.
  SafetensorsFile no_indexer = good;
  c = config;
  c.index_heads = 0;
  no_indexer.metadata["config"] = tiny_lm_config_json(c);
  expect_error([&] { TinyLm::from_safetensors(no_indexer, "m"); }, {"index_", "unexpected", "index_heads 0"});
  // ...and without them it loads, with empty indexer views.
  for (std::int64_t l = 0; l < config.layers; ++l) {
    for (const char* name : {"index_wq", "index_wk", "index_ww"}) {
      no_indexer = without(no_indexer, "layers." + std::to_string(l) + "." + name);
    }
  }
  const TinyLm plain = TinyLm::from_safetensors(no_indexer, "m");
  EXPECT_TRUE(plain.trace(random_tokens(5, 1)).layers[0].index_q.empty());
  // Another head layout: wq no longer matches.
  SafetensorsFile heads = good;
  c = config;
  c.heads = 4;
  heads.metadata["config"] = tiny_lm_config_json(c);
  expect_error([&] { TinyLm::from_safetensors(heads, "m"); }, {"layers.0.wq", "expected shape [16, 16]"});
}

TEST(TinyLmLoad, BadMetadataIsAnError) {
  const SafetensorsFile good = random_model(tiny_config(), DType::fp32, 3);
  const auto with_metadata = [&](const std::string& key, const std::string& value) {
    SafetensorsFile f = good;
    f.metadata[key] = value;
    return f;
  };
  SafetensorsFile no_format = good;
  no_format.metadata.erase("format");
  expect_error([&] { TinyLm::from_safetensors(no_format, "m"); }, {"format", "missing"});
  expect_error([&] { TinyLm::from_safetensors(with_metadata("format", "keysel-dump/1"), "m"); },
               {"format", "keysel-dump/1"});
  SafetensorsFile no_config = good;
  no_config.metadata.erase("config");
  expect_error([&] { TinyLm::from_safetensors(no_config, "m"); }, {"config", "missing"});
  expect_error([&] { TinyLm::from_safetensors(with_metadata("config", "{\"vocab\": 256,"), "m"); },
               {"config", "valid JSON"});
  expect_error([&] { TinyLm::from_safetensors(with_metadata("config", "[1, 2]"), "m"); }, {"JSON object"});
  std::string text = tiny_lm_config_json(tiny_config());
  const auto replaced = [&](const std::string& from, const std::string& to) {
    std::string s = text;
    const std::size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return s.replace(at, from.size(), to);
  };
  expect_error([&] { TinyLm::from_safetensors(with_metadata("config", replaced("\"ffn_dim\":8,", "")), "m"); },
               {"config.ffn_dim", "present"});
  expect_error(
      [&] { TinyLm::from_safetensors(with_metadata("config", replaced("\"ffn_dim\":8", "\"ffn_dim\":8.5")), "m"); },
      {"config.ffn_dim", "integer"});
  expect_error(
      [&] { TinyLm::from_safetensors(with_metadata("config", replaced("\"kv_heads\":1", "\"kv_heads\":3")), "m"); },
      {"config.kv_heads"});
  expect_error(
      [&] { TinyLm::from_safetensors(with_metadata("config", replaced("\"head_dim\":4", "\"head_dim\":5")), "m"); },
      {"config.head_dim", "even"});
  expect_error([&] { TinyLm::from_safetensors(with_metadata("config", replaced("{", "{\"dropout\":0.1,")), "m"); },
               {"config.dropout", "unknown"});
  expect_error(
      [&] {
        TinyLm::from_safetensors(with_metadata("config", replaced("\"rope_theta\":10000.0", "\"rope_theta\":\"big\"")),
                                 "m");
      },
      {"config.rope_theta", "number"});
}

TEST(TinyLmLoad, NonFiniteWeightsAndCorruptFilesAreErrors) {
  const TinyLmConfig config = tiny_config();
  for (const DType dtype : {DType::fp32, DType::fp16, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dtype));
    SafetensorsFile file = random_model(config, dtype, 4);
    EXPECT_NO_THROW(TinyLm::from_safetensors(file, "m"));
    LoadedTensor& up = tensor_of(file, "layers.1.w_up");
    std::vector<float> values = up.to_float();
    values[13] = std::numeric_limits<float>::quiet_NaN();
    up = LoadedTensor::from_float(up.name, values, up.shape, dtype);
    expect_error([&] { TinyLm::from_safetensors(file, "m"); }, {"layers.1.w_up", "finite", "13"});
    values[13] = 0;
    values[2] = -std::numeric_limits<float>::infinity();
    up = LoadedTensor::from_float(up.name, values, up.shape, dtype);
    expect_error([&] { TinyLm::from_safetensors(file, "m"); }, {"layers.1.w_up", "finite"});
  }
  // A truncated file fails in the reader, naming the file.
  const SafetensorsFile file = random_model(config, DType::fp16, 5);
  std::vector<std::byte> bytes = serialize_safetensors(file.tensors, file.metadata);
  bytes.resize(bytes.size() - 100);
  const fs::path path = temp_path("truncated.safetensors");
  detail::write_file_bytes("test", path, bytes);
  expect_error([&] { TinyLm::load(path.string()); }, {path.filename().string()});
  fs::remove(path);
  expect_error([&] { TinyLm::load(temp_path("absent.safetensors").string()); }, {"absent.safetensors"});
}

TEST(TinyLmLoad, ConfigJsonRoundTrips) {
  TinyLmConfig c = small_config();
  c.rope_theta = 500000.25;
  c.norm_eps = 1e-6;
  const TinyLmConfig back = parse_tiny_lm_config(tiny_lm_config_json(c));
  EXPECT_EQ(tiny_lm_config_json(back), tiny_lm_config_json(c));
  EXPECT_EQ(back.rope_theta, c.rope_theta);
  EXPECT_EQ(back.norm_eps, c.norm_eps);
  EXPECT_EQ(back.index_dim, c.index_dim);
  TinyLmConfig bad = c;
  bad.index_dim = 7;
  expect_error([&] { bad.validate("test"); }, {"config.index_dim"});
  bad.index_heads = 0;  // no indexer: index_dim is ignored
  EXPECT_NO_THROW(bad.validate("test"));
}

// ---- bits per byte ------------------------------------------------------------------------------------------

TEST(TinyLmBits, BitsPerByteIsTheMeanNegativeLog2Probability) {
  // Uniform logits over 256 bytes: exactly 8 bits per byte.
  const std::vector<std::uint8_t> tokens = {1, 2, 3, 4};
  EXPECT_NEAR(bits_per_byte(std::vector<float>(4 * 256, 0.5f), tokens, 256), 8.0, 1e-12);
  // Random logits against the formula written out.
  RandomStream random(3);
  std::vector<float> logits(4 * 5);
  random.fill_normal(std::span<float>(logits), 0, 4);
  const std::vector<std::uint8_t> small = {0, 4, 1, 3};
  double expected = 0;
  for (int i = 0; i < 3; ++i) {
    double sum = 0;
    for (int j = 0; j < 5; ++j) sum += std::exp(static_cast<double>(logits[static_cast<std::size_t>(i * 5 + j)]));
    expected -= std::log2(std::exp(static_cast<double>(
                              logits[static_cast<std::size_t>(i * 5 + small[static_cast<std::size_t>(i + 1)])])) /
                          sum);
  }
  EXPECT_NEAR(bits_per_byte(logits, small, 5), expected / 3, 1e-12);
  expect_error([&] { bits_per_byte(logits, small, 4); }, {"logits"});
  expect_error([&] { bits_per_byte(std::vector<float>(4 * 3), small, 3); }, {"tokens", "< vocab"});
  expect_error([&] { bits_per_byte(std::vector<float>(5), std::vector<std::uint8_t>{1}, 5); }, {"at least 2"});
}

TEST(TinyLmBits, WindowsAreIndependentForwardPasses) {
  const TinyLmConfig config = small_config();
  const TinyLm model = TinyLm::from_safetensors(random_model(config, DType::fp16, 29));
  const std::vector<std::uint8_t> text = random_tokens(150, 9);  // windows of 64: 64 + 64 + 22 tokens
  double bits = 0;
  for (std::int64_t start = 0; start < 150; start += 64) {
    const auto window = std::span<const std::uint8_t>(text).subspan(
        static_cast<std::size_t>(start), static_cast<std::size_t>(std::min<std::int64_t>(64, 150 - start)));
    bits += bits_per_byte(model.logits(window), window, 256) * static_cast<double>(window.size() - 1);
  }
  const double windowed = windowed_bits_per_byte(model, text, 64);
  EXPECT_NEAR(windowed, bits / (150 - 3), 1e-9);
  // A random model predicts bytes about as badly as chance, and different windows give different results.
  EXPECT_GT(windowed, 4.0);
  EXPECT_NE(windowed_bits_per_byte(model, text, 50), windowed);
  // With every key selected, the sparse forward gives the same bits per byte.
  const std::unique_ptr<Selector> exact = make_exact_selector();
  SelectionPolicy policy;
  policy.k = 64;
  EXPECT_NEAR(windowed_bits_per_byte(model, text, 64, with_selector(*exact, policy)), windowed, 1e-5);
  // A last window of one token predicts nothing and counts nothing.
  EXPECT_NEAR(windowed_bits_per_byte(model, std::span<const std::uint8_t>(text).first(129), 64),
              windowed_bits_per_byte(model, std::span<const std::uint8_t>(text).first(128), 64), 1e-9);
  expect_error([&] { windowed_bits_per_byte(model, text, 65); }, {"window", "context = 64"});
  expect_error([&] { windowed_bits_per_byte(model, text, 1); }, {"text", "predict"});
  expect_error([&] { windowed_bits_per_byte(TinyLm(), text, 8); }, {"model"});
}

TEST(TinyLmDirectory, EnvironmentVariableComesFirst) {
  const char* saved = std::getenv("KEYSEL_TINY_LM_DIR");
  const std::string previous = saved ? saved : "";
  const fs::path dir = temp_path("model_dir");
  fs::create_directories(dir);
  ::setenv("KEYSEL_TINY_LM_DIR", dir.c_str(), 1);
  expect_error([&] { tiny_lm_directory(); }, {"KEYSEL_TINY_LM_DIR", dir.string(), "model.safetensors"});
  std::ofstream(dir / "model.safetensors") << "x";
  EXPECT_EQ(tiny_lm_directory(), dir.string());
  fs::remove_all(dir);
  if (saved) {
    ::setenv("KEYSEL_TINY_LM_DIR", previous.c_str(), 1);
  } else {
    ::unsetenv("KEYSEL_TINY_LM_DIR");
  }
}

// ---- the shipped model --------------------------------------------------------------------------------------

std::vector<std::uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

const TinyLm& shipped_model() {
  static const TinyLm model = TinyLm::load((fs::path(tiny_lm_directory()) / "model.safetensors").string());
  return model;
}

TEST(TinyLmShipped, HasTheDocumentedShape) {
  const TinyLmConfig& c = shipped_model().config();
  EXPECT_EQ(c.vocab, 256);
  EXPECT_EQ(c.d_model, 384);
  EXPECT_EQ(c.layers, 6);
  EXPECT_EQ(c.heads, 6);
  EXPECT_EQ(c.kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.ffn_dim, 1024);
  EXPECT_EQ(c.context, 4096);
  EXPECT_EQ(c.index_heads, 4);
  EXPECT_EQ(c.index_dim, 32);
}

TEST(TinyLmShipped, LogitsMatchThePyTorchModel) {
  const fs::path dir = tiny_lm_directory();
  const SafetensorsFile expected = read_safetensors(dir / "logits.safetensors");
  const LoadedTensor& tokens_tensor = expected.at("tokens");
  const LoadedTensor& logits_tensor = expected.at("logits");
  ASSERT_EQ(tokens_tensor.shape, (std::vector<std::int64_t>{512}));
  ASSERT_EQ(logits_tensor.shape, (std::vector<std::int64_t>{512, 256}));
  const std::vector<float> token_values = tokens_tensor.to_float();
  const std::vector<std::uint8_t> tokens(token_values.begin(), token_values.end());
  const std::vector<float> reference = logits_tensor.to_float();

  const TinyLm& model = shipped_model();
  const std::vector<float> fast = model.logits(tokens);
  const double fast_diff = max_relative_difference(fast, reference);
  std::cout << "[ tiny_lm ] shipped model, 512 tokens: fp32 forward vs PyTorch float64 max rel diff " << fast_diff
            << "\n";
  EXPECT_LE(fast_diff, 1e-3);
  // The double reference on a prefix (causal: the same rows) agrees more closely.
  constexpr std::int64_t kPrefix = 24;
  const std::vector<double> ours = tiny_lm_reference_logits(model, prefix(tokens, kPrefix));
  const std::vector<float> theirs(reference.begin(), reference.begin() + kPrefix * 256);
  const double reference_diff = max_relative_difference(ours, theirs);
  std::cout << "[ tiny_lm ] shipped model, " << kPrefix << " tokens: double reference vs PyTorch float64 "
            << reference_diff << "\n";
  EXPECT_LE(reference_diff, 1e-6);
}

TEST(TinyLmShipped, BitsPerByteOfTheHeldOutTextMatchPyTorch) {
  const fs::path dir = tiny_lm_directory();
  const std::vector<std::uint8_t> text = read_bytes(dir / "eval.txt");
  ASSERT_EQ(text.size(), 32768u);
  const SafetensorsFile expected = read_safetensors(dir / "logits.safetensors");
  const auto it = expected.metadata.find("bpb_eval");
  ASSERT_NE(it, expected.metadata.end()) << "logits.safetensors has no metadata bpb_eval";
  const double pytorch = std::stod(it->second);

  const TinyLm& model = shipped_model();
  const auto start = std::chrono::steady_clock::now();
  const double bpb = windowed_bits_per_byte(model, text, model.config().context);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ostringstream line;
  line << std::setprecision(8) << "[ tiny_lm ] eval.txt in windows of " << model.config().context << ": " << bpb
       << " bits per byte (PyTorch " << pytorch << ", difference " << bpb - pytorch << "), " << std::setprecision(3)
       << seconds << " s for " << text.size() / static_cast<std::size_t>(model.config().context) << " forward passes\n";
  std::cout << line.str();
  EXPECT_LT(bpb, 1.2);
  EXPECT_NEAR(bpb, pytorch, 1e-3);
}

TEST(TinyLmShipped, LayerInputsMatchTheDump) {
  const fs::path dir = tiny_lm_directory();
  const Dump dump = load_dump(dir / "dump.safetensors");
  const std::vector<std::uint8_t> text = read_bytes(dir / "eval.txt");
  const TinyLm& model = shipped_model();
  const DumpLayer& layer0 = dump.layer(0);
  const std::int64_t T = layer0.q.shape[0];
  ASSERT_EQ(T, 1024);
  const TinyLmTrace trace = model.trace(prefix(text, T));
  for (const DumpLayer& layer : dump.layers) {
    SCOPED_TRACE("layer " + std::to_string(layer.index));
    const TinyLmLayerRecord& ours = trace.layers[static_cast<std::size_t>(layer.index)];
    // The dump holds fp16: ours rounded to fp16 lies within half an fp16 step of theirs, plus fp32 noise.
    const auto compare = [&](const char* what, const std::vector<float>& mine, const LoadedTensor& dumped) {
      const std::vector<float> theirs = dumped.to_float();
      ASSERT_EQ(mine.size(), theirs.size()) << what;
      double worst = 0;  // in units of the fp16 rounding bound
      for (std::size_t i = 0; i < mine.size(); ++i) {
        const double bound =
            std::max(std::abs(static_cast<double>(theirs[i])) * std::ldexp(1.0, -11), std::ldexp(1.0, -25)) +
            1e-5 * (1 + std::abs(static_cast<double>(theirs[i])));
        worst = std::max(worst, std::abs(static_cast<double>(mine[i]) - theirs[i]) / bound);
      }
      std::cout << "[ tiny_lm ] layer " << layer.index << " " << what << ": max |ours - dump| / fp16 bound " << worst
                << "\n";
      EXPECT_LE(worst, 1.0) << what;
    };
    compare("q", ours.q, layer.q);
    compare("k", ours.k, layer.k);
    compare("v", ours.v, layer.v);
    if (layer.index_q) compare("index_q", ours.index_q, *layer.index_q);
    if (layer.index_k) compare("index_k", ours.index_k, *layer.index_k);
    if (layer.index_w) compare("index_w", ours.index_w, *layer.index_w);
  }
}

}  // namespace
}  // namespace keysel
