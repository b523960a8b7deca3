// The Lightning Indexer's training objectives (SPEC §9.1): the double-precision reference against a naive
// transcription written here, its gradients against central finite differences (fp64 inputs, so the only
// errors are the O(h^2) truncation and rounding: 1e-6 relative bounds), and bad input.
#include "keysel/indexer/indexer_training.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/random.h"

namespace keysel {
namespace {

struct Problem {
  std::int64_t T = 5, HI = 3, DI = 4, N = 11;
  std::vector<double> q, w, k, target;
  std::vector<std::int32_t> positions = {10, 3, 0, 20, 7};
  std::vector<std::int32_t> selection;  // [T, 1, W]
  std::int64_t width = 4;

  TensorView q_view() { return TensorView(q.data(), DType::fp64, {T, HI, DI}); }
  TensorView w_view() { return TensorView(w.data(), DType::fp64, {T, HI}); }
  TensorView k_view() { return TensorView(k.data(), DType::fp64, {N, DI}); }
  TensorView target_view() { return TensorView(target.data(), DType::fp64, {T, N}); }
  TensorView positions_view() { return TensorView(positions.data(), DType::int32, {T}); }
  TensorView selection_view() { return TensorView(selection.data(), DType::int32, {T, 1, width}); }
  std::int64_t allowed(std::int64_t t) const {
    return std::min<std::int64_t>(positions[static_cast<std::size_t>(t)] + 1, N);
  }
};

Problem make_problem(std::uint64_t seed) {
  Problem p;
  RandomStream rng(seed);
  p.q.resize(static_cast<std::size_t>(p.T * p.HI * p.DI));
  p.w.resize(static_cast<std::size_t>(p.T * p.HI));
  p.k.resize(static_cast<std::size_t>(p.N * p.DI));
  for (double& x : p.q) x = rng.normal();
  for (double& x : p.w) x = rng.normal();
  for (double& x : p.k) x = rng.normal();
  // A target distribution over each row's allowed keys, one allowed key with zero mass in row 0.
  p.target.assign(static_cast<std::size_t>(p.T * p.N), 0.0);
  for (std::int64_t t = 0; t < p.T; ++t) {
    double sum = 0.0;
    for (std::int64_t s = 0; s < p.allowed(t); ++s) {
      sum += p.target[static_cast<std::size_t>(t * p.N + s)] = rng.uniform();
    }
    for (std::int64_t s = 0; s < p.allowed(t); ++s) p.target[static_cast<std::size_t>(t * p.N + s)] /= sum;
  }
  p.target[2] = 0.0;
  // The selection: row 2 (position 0) empty, the others random distinct allowed keys.
  RandomStream pick(seed, 3);
  p.selection.assign(static_cast<std::size_t>(p.T * p.width), -1);
  for (std::int64_t t = 0; t < p.T; ++t) {
    if (t == 2) continue;
    std::vector<std::int32_t> keys(static_cast<std::size_t>(p.allowed(t)));
    std::iota(keys.begin(), keys.end(), 0);
    pick.shuffle(std::span<std::int32_t>(keys));
    const std::int64_t count = std::min<std::int64_t>(p.width, p.allowed(t));
    for (std::int64_t i = 0; i < count; ++i) {
      p.selection[static_cast<std::size_t>(t * p.width + i)] = keys[static_cast<std::size_t>(i)];
    }
  }
  return p;
}

/// The loss written out directly: per row, the key set, I, log-softmax, renormalised target, KL; then the mean.
double naive_loss(const Problem& p, bool sparse) {
  double total = 0.0;
  int rows = 0;
  for (std::int64_t t = 0; t < p.T; ++t) {
    std::vector<std::int64_t> set;
    if (sparse) {
      for (std::int64_t i = 0; i < p.width; ++i) {
        const std::int32_t s = p.selection[static_cast<std::size_t>(t * p.width + i)];
        if (s >= 0) set.push_back(s);
      }
    } else {
      for (std::int64_t s = 0; s < p.allowed(t); ++s) set.push_back(s);
    }
    double mass = 0.0;
    for (const std::int64_t s : set) mass += p.target[static_cast<std::size_t>(t * p.N + s)];
    if (set.empty() || mass == 0.0) continue;
    std::vector<double> score;
    for (const std::int64_t s : set) {
      double value = 0.0;
      for (std::int64_t j = 0; j < p.HI; ++j) {
        double dot = 0.0;
        for (std::int64_t d = 0; d < p.DI; ++d) {
          dot += p.q[static_cast<std::size_t>((t * p.HI + j) * p.DI + d)] * p.k[static_cast<std::size_t>(s * p.DI + d)];
        }
        value += p.w[static_cast<std::size_t>(t * p.HI + j)] * (dot > 0.0 ? dot : 0.0);
      }
      score.push_back(value);
    }
    double z = 0.0;
    for (const double x : score) z += std::exp(x);
    double kl = 0.0;
    for (std::size_t i = 0; i < set.size(); ++i) {
      const double target = p.target[static_cast<std::size_t>(t * p.N + set[i])] / mass;
      if (target > 0.0) kl += target * std::log(target / (std::exp(score[i]) / z));
    }
    total += kl;
    ++rows;
  }
  return total / rows;
}

TEST(IndexerKlLoss, MatchesTheNaiveTranscriptionDenseAndSparse) {
  Problem p = make_problem(1);
  const double dense = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                 p.positions_view(), TensorView());
  EXPECT_NEAR(dense, naive_loss(p, false), 1e-12 * (1.0 + dense));
  EXPECT_GT(dense, 0.01);
  const double sparse = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                  p.positions_view(), p.selection_view());
  EXPECT_NEAR(sparse, naive_loss(p, true), 1e-12 * (1.0 + sparse));
  // The sum counts the rows that have keys: 5 (dense), 4 (sparse: row 2 is empty).
  const double dense_sum = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                     p.positions_view(), TensorView(), LossReduction::sum);
  EXPECT_NEAR(dense_sum, 5.0 * dense, 1e-12 * (1.0 + dense_sum));
  const double sparse_sum = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                      p.positions_view(), p.selection_view(), LossReduction::sum);
  EXPECT_NEAR(sparse_sum, 4.0 * sparse, 1e-12 * (1.0 + sparse_sum));
}

TEST(IndexerKlLoss, IsZeroWhenTheIndexerMatchesTheTarget) {
  // One key dimension with w = 1 and qI = 1: I[t,s] = ReLU(kI[s]); the target softmax(ReLU(kI)) makes KL 0.
  Problem p;
  p.T = 2, p.HI = 1, p.DI = 1, p.N = 4;
  p.q = {1.0, 1.0};
  p.w = {1.0, 1.0};
  p.k = {0.3, -0.2, 1.7, 0.9};
  p.positions = {3, 1};
  p.target.assign(8, 0.5);  // entries past a row's allowed keys are ignored
  std::vector<double> e(4);
  for (std::size_t s = 0; s < 4; ++s) e[s] = std::exp(std::max(p.k[s], 0.0));
  const double z0 = e[0] + e[1] + e[2] + e[3], z1 = e[0] + e[1];
  for (std::size_t s = 0; s < 4; ++s) p.target[s] = e[s] / z0;
  for (std::size_t s = 0; s < 2; ++s) p.target[4 + s] = e[s] / z1;
  std::vector<double> dk(4, -1.0);
  const IndexerLossGradients gradients{TensorView(), TensorView(), TensorView(dk.data(), DType::fp64, {4, 1})};
  const double loss = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                p.positions_view(), TensorView(), LossReduction::mean, gradients);
  EXPECT_NEAR(loss, 0.0, 1e-15);
  for (const double g : dk) EXPECT_NEAR(g, 0.0, 1e-15);
}

TEST(IndexerKlLoss, GradientsMatchCentralFiniteDifferences) {
  for (const bool sparse : {false, true}) {
    for (const LossReduction reduction : {LossReduction::mean, LossReduction::sum}) {
      SCOPED_TRACE(std::string(sparse ? "sparse" : "dense") + (reduction == LossReduction::mean ? " mean" : " sum"));
      Problem p = make_problem(sparse ? 2 : 3);
      const TensorView selection = sparse ? p.selection_view() : TensorView();
      std::vector<double> dq(p.q.size(), -7.0), dw(p.w.size(), -7.0), dk(p.k.size(), -7.0);
      indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(), p.positions_view(), selection,
                                reduction,
                                {TensorView(dq.data(), DType::fp64, {p.T, p.HI, p.DI}),
                                 TensorView(dw.data(), DType::fp64, {p.T, p.HI}),
                                 TensorView(dk.data(), DType::fp64, {p.N, p.DI})});
      const double h = 1e-6;
      double largest = 0.0;
      const auto check = [&](std::vector<double>& values, const std::vector<double>& grad, const char* name) {
        for (std::size_t i = 0; i < values.size(); ++i) {
          const double x0 = values[i];
          values[i] = x0 + h;
          const double plus = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                        p.positions_view(), selection, reduction);
          values[i] = x0 - h;
          const double minus = indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(),
                                                         p.positions_view(), selection, reduction);
          values[i] = x0;
          const double slope = (plus - minus) / (2.0 * h);
          ASSERT_NEAR(grad[i], slope, 1e-6 * (1.0 + std::abs(slope))) << name << "[" << i << "]";
          largest = std::max(largest, std::abs(grad[i]));
        }
      };
      check(p.q, dq, "dq");
      check(p.w, dw, "dw");
      check(p.k, dk, "dk");
      EXPECT_GT(largest, 0.05);
    }
  }
}

TEST(IndexerKlLoss, RejectsBadInputNamingTheArgument) {
  Problem p = make_problem(4);
  const auto expect_error = [](const auto& body, const std::string& argument) {
    try {
      body();
      ADD_FAILURE() << "no error for " << argument;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(argument), std::string::npos) << e.what();
    }
  };
  std::vector<double> dk(p.k.size(), -7.0);
  expect_error([&] {
    indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(), p.positions_view(), TensorView(),
                              LossReduction::mean,
                              {TensorView(), TensorView(), TensorView(dk.data(), DType::fp64, {p.N, 3})});
  }, "gradients.keys");
  p.target[1] = -0.5;
  expect_error([&] {
    indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(), p.positions_view(), TensorView());
  }, "target");
  p.target[1] = 0.5;
  p.selection[static_cast<std::size_t>(1 * p.width)] = 9;  // row 1 (position 3) reads keys 0..3
  expect_error([&] {
    indexer_kl_loss_reference(p.target_view(), p.q_view(), p.w_view(), p.k_view(), p.positions_view(),
                              p.selection_view());
  }, "selection");
  expect_error([&] {
    indexer_kl_loss_reference(p.target_view(), p.q_view(), TensorView(p.w.data(), DType::fp64, {p.T, 2}), p.k_view(),
                              p.positions_view(), TensorView());
  }, "weights");
  for (const double g : dk) EXPECT_EQ(g, -7.0);
}

}  // namespace
}  // namespace keysel
