// Deterministic random streams.
//
// A stream is identified by (seed, stream id). The generator and the distributions are keysel's own
// (xoshiro256** seeded by splitmix64; Box-Muller normals), so a seed gives the same numbers on every compiler,
// standard library and thread count. Parallel code gives each work item its own stream id.
#pragma once

#include <cstdint>
#include <span>

namespace keysel {

class RandomStream {
 public:
  explicit RandomStream(std::uint64_t seed, std::uint64_t stream = 0);

  /// 64 uniformly random bits.
  std::uint64_t next_u64();
  /// Uniform in [0, 1) with 53 random bits.
  double uniform();
  /// Uniform in [low, high).
  double uniform(double low, double high);
  /// Uniform integer in [0, n); n must be > 0. Unbiased (rejection).
  std::uint64_t uniform_int(std::uint64_t n);
  /// Standard normal.
  double normal();
  double normal(double mean, double stddev) { return mean + stddev * normal(); }
  /// Fills `out` with independent normal(mean, stddev) values.
  void fill_normal(std::span<float> out, double mean = 0.0, double stddev = 1.0);
  void fill_normal(std::span<double> out, double mean = 0.0, double stddev = 1.0);
  /// Shuffles `values` in place (Fisher-Yates).
  template <typename T>
  void shuffle(std::span<T> values) {
    for (std::size_t i = values.size(); i > 1; --i) {
      const std::size_t j = static_cast<std::size_t>(uniform_int(i));
      T tmp = values[i - 1];
      values[i - 1] = values[j];
      values[j] = tmp;
    }
  }

 private:
  std::uint64_t state_[4];
  double spare_normal_ = 0.0;
  bool has_spare_normal_ = false;
};

}  // namespace keysel
