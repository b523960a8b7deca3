// The guards against hostile sizes and half-written files (docs/reliability.md): checked arithmetic, policy
// bounds, thread bounds, memory checks and atomic file writes.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

#include "keysel/core/checked.h"
#include "keysel/core/files.h"
#include "keysel/core/memory.h"
#include "keysel/core/selection.h"
#include "keysel/core/tensor.h"
#include "keysel/core/threads.h"

namespace keysel {
namespace {

namespace fs = std::filesystem;

std::string message_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string read(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

/// A fresh scratch directory per test.
fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("keysel_reliability_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

TEST(Checked, SumsAndProductsThatLeaveInt64Throw) {
  EXPECT_EQ(checked_add(INT64_MAX - 2, 2, "f", "a"), INT64_MAX);
  EXPECT_EQ(checked_mul(3037000499, 3037000499, "f", "a"), 3037000499LL * 3037000499LL);
  const std::string sum = message_of([] { checked_add(INT64_MAX, 2, "f", "n_sink + n_local"); });
  EXPECT_NE(sum.find("argument 'n_sink + n_local'"), std::string::npos) << sum;
  EXPECT_NE(sum.find("9223372036854775807 + 2"), std::string::npos) << sum;
  EXPECT_THROW(checked_mul(3037000500, 3037000500, "f", "a"), Error);
  EXPECT_THROW(checked_mul(-INT64_MAX, 2, "f", "a"), Error);
  EXPECT_EQ(checked_product({7, 11, 13}, "f", "a"), 1001);
  EXPECT_EQ(checked_product({INT64_MAX, 0}, "f", "a"), 0);
  EXPECT_THROW(checked_product({1 << 22, 1 << 22, 1 << 22}, "f", "a"), Error);
  EXPECT_THROW(checked_product({4, -1}, "f", "a"), Error);
}

TEST(Checked, CeilDivAndSaturatingMulNeverOverflow) {
  EXPECT_EQ(ceil_div(0, 7), 0);
  EXPECT_EQ(ceil_div(14, 7), 2);
  EXPECT_EQ(ceil_div(15, 7), 3);
  EXPECT_EQ(ceil_div(157, INT64_MAX), 1);
  EXPECT_EQ(ceil_div(INT64_MAX, INT64_MAX), 1);
  EXPECT_EQ(ceil_div(INT64_MAX, 1), INT64_MAX);
  EXPECT_EQ(saturating_mul(1LL << 40, 1LL << 40, 1000), 1000);
  EXPECT_EQ(saturating_mul(30, 30, 1000), 900);
}

TEST(Reliability, PolicyCountsAreBoundedByInt32Positions) {
  SelectionPolicy policy;
  policy.k = 4;
  policy.n_sink = INT64_MAX;
  policy.n_local = 2;
  const std::string wrap = message_of([&] { policy.validate("f"); });
  EXPECT_NE(wrap.find("argument 'policy.n_sink'"), std::string::npos) << wrap;
  EXPECT_NE(wrap.find("2147483647"), std::string::npos) << wrap;
  policy.kept_on_top = true;
  EXPECT_THROW(policy.validate("f"), Error);
  EXPECT_EQ(policy.width(), INT64_MAX);  // saturates instead of wrapping, even unvalidated
  policy = SelectionPolicy{};
  policy.k = kMaxKeyPositions + 1;
  EXPECT_NE(message_of([&] { policy.validate("f"); }).find("policy.k"), std::string::npos);
  policy.k = kMaxKeyPositions;
  policy.n_local = kMaxKeyPositions;
  policy.n_sink = kMaxKeyPositions;
  policy.kept_on_top = true;
  EXPECT_NO_THROW(policy.validate("f"));
  EXPECT_EQ(policy.width(), 3 * kMaxKeyPositions);
}

TEST(Reliability, TensorShapesWhoseElementCountOverflowsThrow) {
  const std::int64_t big = std::int64_t{1} << 32;
  float x = 0;
  const std::string m = message_of([&] { TensorView(&x, DType::fp32, {big, big, big}); });
  EXPECT_NE(m.find("argument 'shape'"), std::string::npos) << m;
  EXPECT_NE(m.find("int64"), std::string::npos) << m;
}

TEST(Reliability, ThreadCountsAreBounded) {
  const int before = num_threads();
  const std::string m = message_of([] { set_num_threads(65536); });
  EXPECT_NE(m.find("argument 'threads'"), std::string::npos) << m;
  EXPECT_NE(m.find("65536"), std::string::npos) << m;
  EXPECT_THROW(set_num_threads(-1), Error);
  EXPECT_EQ(num_threads(), before);
  EXPECT_GE(max_threads(), 1024);
  EXPECT_GE(max_threads(), hardware_threads());
}

TEST(Reliability, MemoryChecksNameTheEstimateAndWhatIsAvailable) {
  EXPECT_GT(available_memory_bytes(), 0u);  // Linux: /proc/meminfo is there
  EXPECT_EQ(format_bytes(999), "999 bytes");
  EXPECT_EQ(format_bytes(51.2e9), "51.2 GB");
  EXPECT_NO_THROW(check_memory(1e9, 2'000'000'000, "f", "the study"));
  EXPECT_NO_THROW(check_memory(1e30, 0, "f", "the study"));  // unknown: not checked
  const std::string m = message_of([] { check_memory(51.2e9, 24'000'000'000, "run_study", "the study of w"); });
  EXPECT_EQ(m, "keysel::run_study: the study of w needs an estimated 51.2 GB of memory; this machine has 24.0 GB "
               "available");
}

TEST(AtomicFiles, WriteReplacesWholeAndLeavesNoTemporary) {
  const fs::path dir = scratch("write");
  const fs::path file = dir / "a.json";
  write_file_atomically(file, "first", "f", "out");
  EXPECT_EQ(read(file), "first");
  write_file_atomically(file, "second, longer", "f", "out");
  EXPECT_EQ(read(file), "second, longer");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator{}), 1);
}

TEST(AtomicFiles, AFailureLeavesEveryFileAsItWas) {
  const fs::path dir = scratch("set");
  write_file_atomically(dir / "a.csv", "old a", "f", "out");
  // The second destination's directory does not exist: nothing may change, and no temporary may remain.
  const std::string m = message_of([&] {
    write_files_atomically({{dir / "a.csv", "new a"}, {dir / "missing" / "b.csv", "new b"}}, "write_study_outputs",
                           "directory");
  });
  EXPECT_NE(m.find("argument 'directory'"), std::string::npos) << m;
  EXPECT_NE(m.find("b.csv"), std::string::npos) << m;
  EXPECT_EQ(read(dir / "a.csv"), "old a");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator{}), 1);
}

TEST(AtomicFiles, OutputPathsAreCheckedBeforeAnyWork) {
  const fs::path dir = scratch("check");
  write_file_atomically(dir / "file", "x", "f", "out");
  EXPECT_NO_THROW(check_output_path(dir / "new.json", OutputKind::file, "f", "--json"));
  EXPECT_NO_THROW(check_output_path(dir / "new" / "deeper", OutputKind::directory, "f", "--out"));
  EXPECT_NO_THROW(check_output_path(dir, OutputKind::directory, "f", "--out"));
  EXPECT_NO_THROW(check_output_path(dir / "file", OutputKind::file, "f", "--json"));
  EXPECT_FALSE(fs::exists(dir / "new"));  // checking creates nothing
  const auto fails = [](const fs::path& p, OutputKind kind, const std::string& needle) {
    const std::string m = message_of([&] { check_output_path(p, kind, "study", "--out"); });
    EXPECT_NE(m.find("argument '--out'"), std::string::npos) << m;
    EXPECT_NE(m.find(needle), std::string::npos) << m;
  };
  fails("", OutputKind::directory, "an empty path");
  fails(dir / "file", OutputKind::directory, "not a directory");
  fails(dir, OutputKind::file, "is a directory");
  fails(dir / "missing" / "x.json", OutputKind::file, "does not exist");
  if (::geteuid() != 0) {  // root writes anywhere
    const fs::path locked = dir / "locked";
    fs::create_directories(locked);
    ::chmod(locked.c_str(), 0500);
    fails(locked / "x.json", OutputKind::file, "not writable");
    ::chmod(locked.c_str(), 0700);
  }
}

}  // namespace
}  // namespace keysel
