#include "keysel/core/random.h"

#include <cmath>
#include <numbers>

#include "keysel/core/error.h"

namespace keysel {
namespace {

std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

RandomStream::RandomStream(std::uint64_t seed, std::uint64_t stream) {
  // Mix the stream id through its own splitmix step so that neighbouring (seed, stream) pairs diverge.
  std::uint64_t s = stream;
  std::uint64_t x = seed ^ splitmix64(s);
  for (auto& word : state_) word = splitmix64(x);
}

std::uint64_t RandomStream::next_u64() {
  const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
  const std::uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return result;
}

double RandomStream::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

double RandomStream::uniform(double low, double high) { return low + (high - low) * uniform(); }

std::uint64_t RandomStream::uniform_int(std::uint64_t n) {
  KEYSEL_CHECK_ARG(n > 0, "n", "> 0", n);
  const std::uint64_t limit = (~std::uint64_t{0}) - ((~std::uint64_t{0}) % n + 1) % n;  // largest multiple - 1
  std::uint64_t x;
  do {
    x = next_u64();
  } while (x > limit);
  return x % n;
}

double RandomStream::normal() {
  if (has_spare_normal_) {
    has_spare_normal_ = false;
    return spare_normal_;
  }
  double u1;
  do {
    u1 = uniform();
  } while (u1 <= 0.0);
  const double u2 = uniform();
  const double radius = std::sqrt(-2.0 * std::log(u1));
  const double angle = 2.0 * std::numbers::pi * u2;
  spare_normal_ = radius * std::sin(angle);
  has_spare_normal_ = true;
  return radius * std::cos(angle);
}

void RandomStream::fill_normal(std::span<float> out, double mean, double stddev) {
  for (auto& x : out) x = static_cast<float>(normal(mean, stddev));
}

void RandomStream::fill_normal(std::span<double> out, double mean, double stddev) {
  for (auto& x : out) x = normal(mean, stddev);
}

}  // namespace keysel
