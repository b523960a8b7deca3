// Deterministic random streams and thread control.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/core/threads.h"

namespace keysel {
namespace {

TEST(RandomStream, SameSeedAndStreamGiveSameNumbers) {
  RandomStream a(42, 7), b(42, 7);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(a.next_u64(), b.next_u64());
}

TEST(RandomStream, StreamsAndSeedsDiverge) {
  RandomStream a(42, 0), b(42, 1), c(43, 0);
  int same_ab = 0, same_ac = 0;
  for (int i = 0; i < 1000; ++i) {
    const auto x = a.next_u64();
    same_ab += x == b.next_u64();
    same_ac += x == c.next_u64();
  }
  EXPECT_EQ(same_ab, 0);
  EXPECT_EQ(same_ac, 0);
}

// The generator is specified (splitmix64-seeded xoshiro256**), so a seed gives the same bits everywhere. This
// independent transcription of the published algorithms pins it: a change here changes every seeded workload.
std::uint64_t test_splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

TEST(RandomStream, IsSplitmixSeededXoshiro256StarStar) {
  const std::uint64_t seed = 1234, stream = 5;
  std::uint64_t st = stream;
  std::uint64_t x = seed ^ test_splitmix64(st);
  std::uint64_t s[4];
  for (auto& w : s) w = test_splitmix64(x);
  auto rotl = [](std::uint64_t v, int k) { return (v << k) | (v >> (64 - k)); };
  RandomStream rng(seed, stream);
  for (int i = 0; i < 100; ++i) {
    const std::uint64_t expected = rotl(s[1] * 5, 7) * 9;
    const std::uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    ASSERT_EQ(rng.next_u64(), expected) << "draw " << i;
  }
}

TEST(RandomStream, UniformMomentsAndRange) {
  RandomStream rng(3);
  const int n = 200000;
  double sum = 0, sum2 = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    sum2 += u * u;
  }
  EXPECT_NEAR(sum / n, 0.5, 0.005);
  EXPECT_NEAR(sum2 / n - (sum / n) * (sum / n), 1.0 / 12.0, 0.002);
}

TEST(RandomStream, NormalMoments) {
  RandomStream rng(5);
  const int n = 200000;
  double sum = 0, sum2 = 0, sum4 = 0;
  for (int i = 0; i < n; ++i) {
    const double x = rng.normal();
    sum += x;
    sum2 += x * x;
    sum4 += x * x * x * x;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sum2 / n, 1.0, 0.015);
  EXPECT_NEAR(sum4 / n, 3.0, 0.1);  // Gaussian kurtosis
}

TEST(RandomStream, UniformIntIsUnbiasedAndInRange) {
  RandomStream rng(11);
  std::vector<int> counts(7, 0);
  const int n = 70000;
  for (int i = 0; i < n; ++i) {
    const auto x = rng.uniform_int(7);
    ASSERT_LT(x, 7u);
    ++counts[x];
  }
  for (int c : counts) EXPECT_NEAR(c, n / 7, 500);
  EXPECT_THROW(rng.uniform_int(0), Error);
}

TEST(RandomStream, ShuffleIsAPermutation) {
  RandomStream rng(9);
  std::vector<int> v(101);
  std::iota(v.begin(), v.end(), 0);
  rng.shuffle(std::span<int>(v));
  EXPECT_FALSE(std::is_sorted(v.begin(), v.end()));
  std::sort(v.begin(), v.end());
  for (int i = 0; i < 101; ++i) EXPECT_EQ(v[i], i);
}

TEST(Threads, SetAndRestore) {
  const int before = num_threads();
  {
    ScopedThreads scoped(1);
    EXPECT_EQ(num_threads(), 1);
    {
      ScopedThreads inner(3);
      EXPECT_EQ(num_threads(), 3);
    }
    EXPECT_EQ(num_threads(), 1);
  }
  EXPECT_EQ(num_threads(), before);
  EXPECT_GE(hardware_threads(), 1);
}

TEST(Threads, NegativeCountIsRejected) {
  try {
    set_num_threads(-2);
    FAIL() << "expected keysel::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("threads"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("-2"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace keysel
