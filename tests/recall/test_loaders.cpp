// Loaders of real tensors (safetensors, .npy) and attention dumps: round trips for every dtype, corrupted,
// truncated and lying files (each must give keysel::Error, never a crash or an out-of-bounds read; run under ASan),
// and the dump a real transformers model wrote through tools/capture_dump.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "keysel/attention/reference.h"
#include "keysel/core/error.h"
#include "keysel/core/random.h"
#include "keysel/recall/dump.h"
#include "keysel/recall/loaders.h"
#include "keysel/indexer/selector.h"
#include "keysel/recall/study.h"
#include "keysel/recall/synthetic.h"

namespace keysel {
namespace {

namespace fs = std::filesystem;

fs::path data_dir() { return fs::path(__FILE__).parent_path() / ".." / "data"; }

fs::path temp_path(const std::string& name) {
  return fs::path(::testing::TempDir()) / ("keysel_loaders_" + std::to_string(::getpid()) + "_" + name);
}

/// A safetensors file from a literal JSON header and `data_bytes` bytes of data (value i % 251).
std::vector<std::byte> raw_safetensors(const std::string& header, std::size_t data_bytes) {
  std::vector<std::byte> out(8 + header.size() + data_bytes);
  const std::uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  for (std::size_t i = 0; i < data_bytes; ++i) out[8 + header.size() + i] = static_cast<std::byte>(i % 251);
  return out;
}

/// A .npy file from a header dict text (padded as numpy pads it) and `data_bytes` bytes.
std::vector<std::byte> raw_npy(const std::string& dict, std::size_t data_bytes, int major = 1) {
  std::string header = dict;
  const std::size_t prefix = major == 1 ? 10 : 12;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::vector<std::byte> out(prefix + header.size() + data_bytes);
  const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  std::memcpy(out.data(), magic, 6);
  out[6] = static_cast<std::byte>(major);
  out[7] = std::byte{0};
  if (major == 1) {
    const auto len = static_cast<std::uint16_t>(header.size());
    std::memcpy(out.data() + 8, &len, 2);
  } else {
    const auto len = static_cast<std::uint32_t>(header.size());
    std::memcpy(out.data() + 8, &len, 4);
  }
  std::memcpy(out.data() + prefix, header.data(), header.size());
  for (std::size_t i = 0; i < data_bytes; ++i) out[prefix + header.size() + i] = static_cast<std::byte>(i % 7);
  return out;
}

std::vector<float> test_values(std::size_t n, std::uint64_t seed) {
  RandomStream random(seed);
  std::vector<float> v(n);
  random.fill_normal(std::span<float>(v), 0.0, 3.0);
  if (n > 3) {
    v[0] = 0.0f;
    v[1] = -0.0f;
    v[2] = 1e-6f;  // subnormal in the 8- and 16-bit formats
    v[3] = 300.0f;
  }
  return v;
}

/// Expects `parse` to throw keysel::Error whose message contains every string in `needles`.
template <typename F>
void expect_error(F&& parse, std::initializer_list<std::string_view> needles = {}) {
  try {
    parse();
    ADD_FAILURE() << "expected keysel::Error, nothing was thrown";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string_view needle : needles) {
      EXPECT_NE(message.find(needle), std::string::npos) << "message: " << message << "\nmissing: " << needle;
    }
  }
}

/// A corrupted file must parse into consistent tensors or throw keysel::Error; any other outcome fails.
void expect_safe_safetensors(std::span<const std::byte> bytes) {
  try {
    const SafetensorsFile file = parse_safetensors(bytes, "fuzz");
    for (const LoadedTensor& t : file.tensors) {
      EXPECT_EQ(static_cast<std::int64_t>(t.data.size()), dtype_bytes(t.dtype, t.numel()));
    }
  } catch (const Error&) {
  }
}

void expect_safe_npy(std::span<const std::byte> bytes) {
  try {
    const LoadedTensor t = parse_npy(bytes, "fuzz");
    EXPECT_EQ(static_cast<std::int64_t>(t.data.size()), dtype_bytes(t.dtype, t.numel()));
  } catch (const Error&) {
  }
}

// ---- round trips ------------------------------------------------------------------------------------------------

TEST(SafetensorsTest, RoundTripEveryFloatingDtype) {
  const std::vector<float> values = test_values(2 * 3 * 5, 7);
  for (const DType dtype : {DType::fp32, DType::fp16, DType::bf16, DType::fp8_e4m3, DType::fp8_e5m2, DType::fp64}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const LoadedTensor t = LoadedTensor::from_float("x", values, {2, 3, 5}, dtype);
    const fs::path path = temp_path("rt.safetensors");
    write_safetensors(path, {t}, {{"note", "round trip"}});
    const SafetensorsFile file = read_safetensors(path);
    fs::remove(path);
    ASSERT_EQ(file.tensors.size(), 1u);
    const LoadedTensor& back = file.at("x");
    EXPECT_EQ(back.dtype, dtype);
    EXPECT_EQ(back.shape, (std::vector<std::int64_t>{2, 3, 5}));
    EXPECT_EQ(back.data, t.data);
    EXPECT_EQ(file.metadata.at("note"), "round trip");
    const std::vector<float> decoded = back.to_float();
    for (std::size_t i = 0; i < values.size(); ++i) {
      EXPECT_EQ(decoded[i], round_to_dtype(values[i], dtype)) << "element " << i;
    }
    const TensorView view = back.view();
    EXPECT_EQ(view.dtype(), dtype);
    EXPECT_EQ(view.load({1, 2, 4}), static_cast<double>(decoded[29]));
  }
}

TEST(SafetensorsTest, RoundTripIntegersAndSeveralTensors) {
  const std::vector<std::int32_t> ints{0, -1, 2147483647, -2147483647 - 1, 42};
  LoadedTensor i32 = LoadedTensor::from_int32("positions", ints, {5});
  LoadedTensor i8;
  i8.name = "codes";
  i8.dtype = DType::int8;
  i8.shape = {2, 2};
  i8.data = {std::byte{0x81}, std::byte{0x7f}, std::byte{0}, std::byte{1}};
  LoadedTensor empty = LoadedTensor::from_float("empty", {}, {0, 4});
  LoadedTensor scalar = LoadedTensor::from_float("scalar", std::vector<float>{2.5f}, {});
  const std::vector<std::byte> bytes = serialize_safetensors({i32, i8, empty, scalar});
  const SafetensorsFile file = parse_safetensors(bytes);
  ASSERT_EQ(file.tensors.size(), 4u);
  EXPECT_EQ(file.at("positions").data, i32.data);
  EXPECT_EQ(file.at("positions").dtype, DType::int32);
  EXPECT_EQ(file.at("codes").data, i8.data);
  EXPECT_EQ(file.at("codes").to_float(), (std::vector<float>{-127, 127, 0, 1}));
  EXPECT_EQ(file.at("empty").shape, (std::vector<std::int64_t>{0, 4}));
  EXPECT_EQ(file.at("scalar").to_float(), std::vector<float>{2.5f});
  EXPECT_EQ(file.find("missing"), nullptr);
  expect_error([&] { (void)file.at("missing"); }, {"positions", "missing"});
  // Header is 8-byte aligned, as the reference implementation writes it.
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
}

TEST(SafetensorsTest, Int64IsNarrowedToInt32WithARangeCheck) {
  const std::string header = R"({"p":{"dtype":"I64","shape":[3],"data_offsets":[0,24]}})";
  std::vector<std::byte> bytes = raw_safetensors(header, 24);
  const std::int64_t values[3] = {0, 2147483647, -5};
  std::memcpy(bytes.data() + 8 + header.size(), values, 24);
  const SafetensorsFile file = parse_safetensors(bytes, "i64.safetensors");
  EXPECT_EQ(file.at("p").dtype, DType::int32);
  EXPECT_EQ(file.at("p").to_float(), (std::vector<float>{0.0f, 2147483647.0f, -5.0f}));
  const std::int64_t too_big = std::int64_t{1} << 31;
  std::memcpy(bytes.data() + 8 + header.size() + 8, &too_big, 8);
  expect_error([&] { parse_safetensors(bytes, "i64.safetensors"); },
               {"i64.safetensors", "'p'", "int32 range", "2147483648"});
}

TEST(SafetensorsTest, WriterRejectsWhatItCannotStore) {
  LoadedTensor t = LoadedTensor::from_float("x", std::vector<float>{1, 2}, {2});
  expect_error([&] { serialize_safetensors({t, t}); }, {"distinct"});
  LoadedTensor bad = t;
  bad.data.pop_back();
  expect_error([&] { serialize_safetensors({bad}); }, {"bytes"});
  LoadedTensor int4 = t;
  int4.dtype = DType::int4;
  int4.data.resize(1);
  expect_error([&] { serialize_safetensors({int4}); }, {"int4"});
  expect_error([&] { write_safetensors(temp_path("no_such_dir") / "x.safetensors", {t}); }, {"cannot open"});
  expect_error([&] { read_safetensors(temp_path("does_not_exist.safetensors")); }, {"does_not_exist"});
}

TEST(NpyTest, RoundTripEveryNumpyDtype) {
  const std::vector<float> values = test_values(4 * 3, 11);
  for (const DType dtype : {DType::fp32, DType::fp16, DType::fp64}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const LoadedTensor t = LoadedTensor::from_float("x", values, {4, 3}, dtype);
    const fs::path path = temp_path("values.npy");
    write_npy(path, t);
    const LoadedTensor back = read_npy(path);
    fs::remove(path);
    EXPECT_EQ(back.name, path.stem().string());
    EXPECT_EQ(back.dtype, dtype);
    EXPECT_EQ(back.shape, t.shape);
    EXPECT_EQ(back.data, t.data);
  }
  const std::vector<std::int32_t> ints{3, -4, 5};
  const LoadedTensor i32 = LoadedTensor::from_int32("p", ints, {3});
  const LoadedTensor i32_back = parse_npy(serialize_npy(i32));
  EXPECT_EQ(i32_back.dtype, DType::int32);
  EXPECT_EQ(i32_back.data, i32.data);
  LoadedTensor i8;
  i8.dtype = DType::int8;
  i8.shape = {2};
  i8.data = {std::byte{0xff}, std::byte{3}};
  EXPECT_EQ(parse_npy(serialize_npy(i8)).to_float(), (std::vector<float>{-1, 3}));
  // Scalars and 1-d arrays use numpy's tuple spelling: () and (n,).
  const LoadedTensor scalar = LoadedTensor::from_float("s", std::vector<float>{1.5f}, {});
  EXPECT_TRUE(parse_npy(serialize_npy(scalar)).shape.empty());
  const std::vector<std::byte> bytes = serialize_npy(i32);
  EXPECT_NE(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()).find("'shape': (3,)"),
            std::string::npos);
  EXPECT_EQ((bytes.size() - 12) % 64, 0u);  // data 64-byte aligned
  // bf16 and fp8 have no NumPy dtype.
  expect_error([&] { serialize_npy(LoadedTensor::from_float("b", values, {12}, DType::bf16)); }, {"bf16"});
}

TEST(NpyTest, ReadsEveryVersionAndNumpySpellings) {
  // What numpy writes for np.arange(6, dtype='<i8').reshape(2, 3), in versions 1, 2 and 3.
  for (const int major : {1, 2, 3}) {
    std::vector<std::byte> bytes = raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), }", 48, major);
    for (std::int64_t i = 0; i < 6; ++i) std::memcpy(bytes.data() + bytes.size() - 48 + i * 8, &i, 8);
    const LoadedTensor t = parse_npy(bytes, "arange.npy");
    EXPECT_EQ(t.dtype, DType::int32);
    EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 3}));
    EXPECT_EQ(t.to_float(), (std::vector<float>{0, 1, 2, 3, 4, 5}));
  }
  // Key order, double quotes, Python-2 longs, no trailing comma, fortran order of a 1-d array.
  const LoadedTensor t = parse_npy(raw_npy(R"({"shape": (2L,), "fortran_order": True, "descr": "<f4"})", 8));
  EXPECT_EQ(t.shape, std::vector<std::int64_t>{2});
  EXPECT_EQ(t.dtype, DType::fp32);
  EXPECT_EQ(parse_npy(raw_npy("{'descr': '|i1', 'fortran_order': False, 'shape': (0, 4), }", 0)).numel(), 0);
}

TEST(NpyTest, RejectsWhatItCannotReadWithClearErrors) {
  const auto npy = [](const std::string& dict, std::size_t data) { return raw_npy(dict, data); };
  expect_error([&] { parse_npy(npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8), "be.npy"); },
               {"be.npy", "big-endian", "'>f4'"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16)); }, {"Fortran"});
  expect_error([&] { parse_npy(npy("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16)); }, {"'<c8'"});
  expect_error([&] { parse_npy(npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8)); },
               {"structured"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'shape': (2,), }", 8)); }, {"missing"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8)); }, {"'x'"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 8)); },
               {"non-negative"});
  expect_error(
      [&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", 8)); },
      {"2^62"});
  expect_error(
      [&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }", 8)); },
      {"overflow"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", 8)); },
               {"expected 12 data bytes", "truncated"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 8)); }, {"trailing"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,), }", 4)); },
               {"True or False"});
  expect_error([&] { parse_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } x", 4)); },
               {"after the header"});
  std::vector<std::byte> bad_version = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4);
  bad_version[6] = std::byte{4};
  expect_error([&] { parse_npy(bad_version); }, {"version", "4.0"});
  std::vector<std::byte> bad_magic = bad_version;
  bad_magic[1] = std::byte{'X'};
  expect_error([&] { parse_npy(bad_magic); }, {"magic"});
  std::vector<std::byte> long_header = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4);
  long_header[8] = std::byte{0xff};
  long_header[9] = std::byte{0xff};
  expect_error([&] { parse_npy(long_header); }, {"past the end"});
  std::vector<std::byte> i64 = npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", 8);
  const std::int64_t big = -(std::int64_t{1} << 40);
  std::memcpy(i64.data() + i64.size() - 8, &big, 8);
  expect_error([&] { parse_npy(i64, "pos.npy"); }, {"pos.npy", "int32 range"});
}

// ---- corrupted, truncated and lying safetensors -------------------------------------------------------------------

std::vector<std::byte> small_safetensors() {
  const std::vector<float> values = test_values(6, 3);
  const std::vector<std::int32_t> positions{0, 1, 2};
  return serialize_safetensors(
      {LoadedTensor::from_float("a", values, {2, 3}, DType::bf16), LoadedTensor::from_int32("b", positions, {3}),
       LoadedTensor::from_float("c", values, {6}, DType::fp8_e4m3)},
      {{"format", "test"}});
}

TEST(SafetensorsFuzzTest, EveryTruncationThrows) {
  const std::vector<std::byte> bytes = small_safetensors();
  EXPECT_NO_THROW(parse_safetensors(bytes));
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    SCOPED_TRACE(n);
    // An exactly sized copy, so that ASan sees any read past the end.
    const std::vector<std::byte> prefix(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    expect_error([&] { parse_safetensors(prefix, "cut.safetensors"); }, {"cut.safetensors"});
  }
  const fs::path path = temp_path("truncated.safetensors");
  detail::write_file_bytes("test", path, std::span<const std::byte>(bytes).first(bytes.size() - 1));
  expect_error([&] { read_safetensors(path); }, {path.string(), "'c'", "data_offsets"});
  fs::remove(path);
}

TEST(SafetensorsFuzzTest, EveryHeaderByteCorruptionIsSafe) {
  const std::vector<std::byte> bytes = small_safetensors();
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  for (std::size_t i = 0; i < 8 + header_len; ++i) {
    for (const int value :
         {0x00, 0xff, int{'"'}, int{'{'}, int{'}'}, int{'['}, int{'9'}, int{'-'}, int{' '}, int{'x'}, int{'.'}, 0x80}) {
      std::vector<std::byte> corrupt = bytes;
      corrupt[i] = static_cast<std::byte>(value);
      expect_safe_safetensors(corrupt);
    }
  }
  // Any other header length than the true one is an error.
  for (const std::uint64_t len :
       {std::uint64_t{0}, header_len - 1, header_len + 1, header_len + 8, std::uint64_t{bytes.size()},
        std::numeric_limits<std::uint64_t>::max(), std::uint64_t{1} << 32}) {
    std::vector<std::byte> corrupt = bytes;
    std::memcpy(corrupt.data(), &len, 8);
    expect_error([&] { parse_safetensors(corrupt); });
  }
}

TEST(SafetensorsFuzzTest, RandomMutationsAreSafe) {
  const std::vector<std::byte> bytes = small_safetensors();
  RandomStream random(2024);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::byte> corrupt = bytes;
    const int flips = 1 + static_cast<int>(random.uniform_int(4));
    for (int f = 0; f < flips; ++f) {
      corrupt[random.uniform_int(corrupt.size())] = static_cast<std::byte>(random.uniform_int(256));
    }
    if (random.uniform_int(4) == 0) corrupt.resize(random.uniform_int(corrupt.size() + 1));
    expect_safe_safetensors(corrupt);
  }
}

TEST(SafetensorsFuzzTest, LyingHeadersThrowNamingTheProblem) {
  const auto parse = [](const std::string& header, std::size_t data) {
    return parse_safetensors(raw_safetensors(header, data), "lie.safetensors");
  };
  // The honest file parses.
  EXPECT_NO_THROW(parse(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 16));
  expect_error([&] { parse(R"({"x":{"dtype":"F33","shape":[2,2],"data_offsets":[0,16]}})", 16); },
               {"lie.safetensors", "'x'", "F33", "BF16"});
  expect_error([&] { parse(R"({"x":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", 2); }, {"BOOL"});
  expect_error([&] { parse(R"({"x":{"dtype":"F16","shape":[2,2],"data_offsets":[0,16]}})", 16); },
               {"expected 8 bytes", "16"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})", 16); },
               {"expected 24 bytes"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})", 15); },
               {"data_offsets", "truncated"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]}})", 16); }, {"begin <= end"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,18446744073709551615]}})", 16); },
               {"data_offsets"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2,-2],"data_offsets":[0,16]}})", 16); }, {"shape"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2.0,2],"data_offsets":[0,16]}})", 16); }, {"shape"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":"2x2","data_offsets":[0,16]}})", 16); }, {"array"});
  expect_error(
      [&] {
        parse(R"({"x":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}})", 16);
      },
      {"overflows"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[1,1,1,1,1,1,1],"data_offsets":[0,4]}})", 4); }, {"rank"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2]}})", 8); }, {"data_offsets"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8); }, {"data_offsets"});
  expect_error([&] { parse(R"({"x":[1,2]})", 0); }, {"object"});
  expect_error([&] { parse(R"([1,2])", 0); }, {"JSON object"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8); }, {"not valid JSON"});
  expect_error([&] { parse(R"({"__metadata__":{"a":1}})", 0); }, {"__metadata__", "string"});
  expect_error([&] { parse(R"({"__metadata__":[]})", 0); }, {"__metadata__"});
  expect_error([&] { parse(R"({"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4); }, {"empty name"});
  expect_error(
      [&] {
        parse(
            R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
            16);
      },
      {"'x'", "more than once"});
  expect_error(
      [&] {
        parse(
            R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            12);
      },
      {"overlap"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12); }, {"start at byte 0"});
  expect_error([&] { parse(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 9); }, {"cover"});
}

// ---- files written by the reference writers (tests/data/make_reference_files.py on numpy 2, torch) ------------

TEST(ReferenceFilesTest, SafetensorsWrittenBySafetensorsTorch) {
  const SafetensorsFile file = read_safetensors(data_dir() / "reference" / "reference.safetensors");
  EXPECT_EQ(file.metadata.at("writer"), "safetensors.torch.save_file");
  const std::pair<const char*, DType> floats[] = {{"f32", DType::fp32},         {"f16", DType::fp16},
                                                  {"bf16", DType::bf16},        {"f8_e4m3", DType::fp8_e4m3},
                                                  {"f8_e5m2", DType::fp8_e5m2}, {"f64", DType::fp64}};
  for (const auto& [name, dtype] : floats) {
    SCOPED_TRACE(name);
    const LoadedTensor& t = file.at(name);
    EXPECT_EQ(t.dtype, dtype);
    EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 3, 4}));
    const std::vector<float> values = t.to_float();
    for (int i = 0; i < 24; ++i)
      EXPECT_EQ(values[static_cast<std::size_t>(i)], round_to_dtype((i - 12) / 4.0f, dtype)) << i;
  }
  std::vector<float> i32(12), i64(12), i8(12);
  for (int i = 0; i < 12; ++i) {
    i32[static_cast<std::size_t>(i)] = static_cast<float>(i - 5);
    i64[static_cast<std::size_t>(i)] = static_cast<float>(i * 1000);
    i8[static_cast<std::size_t>(i)] = static_cast<float>(i - 6);
  }
  EXPECT_EQ(file.at("i32").to_float(), i32);
  EXPECT_EQ(file.at("i64").dtype, DType::int32);
  EXPECT_EQ(file.at("i64").to_float(), i64);
  EXPECT_EQ(file.at("i8").to_float(), i8);
}

TEST(ReferenceFilesTest, NpyWrittenByNumpy) {
  const fs::path dir = data_dir() / "reference";
  const LoadedTensor f4 = read_npy(dir / "np_f4_v1.npy");
  EXPECT_EQ(f4.name, "np_f4_v1");
  EXPECT_EQ(f4.dtype, DType::fp32);
  EXPECT_EQ(f4.shape, (std::vector<std::int64_t>{3, 4}));
  for (int i = 0; i < 12; ++i) EXPECT_EQ(f4.to_float()[static_cast<std::size_t>(i)], static_cast<float>(i / 7.0));
  const LoadedTensor f2 = read_npy(dir / "np_f2_v2.npy");
  EXPECT_EQ(f2.dtype, DType::fp16);
  EXPECT_EQ(f2.to_float(), (std::vector<float>{-0.75f, -0.5f, -0.25f, 0.0f, 0.25f, 0.5f}));
  const LoadedTensor i8 = read_npy(dir / "np_i8_v3.npy");
  EXPECT_EQ(i8.dtype, DType::int32);
  EXPECT_EQ(i8.to_float(), (std::vector<float>{-2, -1, 0, 1, 2}));
  const LoadedTensor f8 = read_npy(dir / "np_f8.npy");
  EXPECT_EQ(f8.dtype, DType::fp64);
  EXPECT_EQ(f8.view().load({2}), 2.0 / 3.0);
  EXPECT_EQ(read_npy(dir / "np_i4.npy").to_float(), (std::vector<float>{-3, -2, -1, 0, 1, 2}));
  EXPECT_EQ(read_npy(dir / "np_i1.npy").to_float(), (std::vector<float>{-3, -2, -1, 0, 1, 2}));
  expect_error([&] { read_npy(dir / "np_fortran.npy"); }, {"np_fortran.npy", "Fortran"});
  expect_error([&] { read_npy(dir / "np_bigendian.npy"); }, {"np_bigendian.npy", "big-endian", "'>f4'"});
}

// ---- corrupted and truncated .npy ------------------------------------------------------------------------------

TEST(NpyFuzzTest, TruncationsAndCorruptionsAreSafe) {
  const std::vector<float> values = test_values(6, 4);
  const std::vector<std::byte> bytes = serialize_npy(LoadedTensor::from_float("x", values, {2, 3}, DType::fp16));
  EXPECT_NO_THROW(parse_npy(bytes));
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    SCOPED_TRACE(n);
    const std::vector<std::byte> prefix(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    expect_error([&] { parse_npy(prefix, "cut.npy"); }, {"cut.npy"});
  }
  for (std::size_t i = 0; i < bytes.size() - 12; ++i) {
    for (const int value : {0x00, 0xff, int{'\''}, int{'('}, int{')'}, int{','}, int{'9'}, int{'-'}, int{' '}, int{'L'},
                            int{'>'}, int{'}'}}) {
      std::vector<std::byte> corrupt = bytes;
      corrupt[i] = static_cast<std::byte>(value);
      expect_safe_npy(corrupt);
    }
  }
  RandomStream random(77);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::byte> corrupt = bytes;
    const int flips = 1 + static_cast<int>(random.uniform_int(4));
    for (int f = 0; f < flips; ++f) {
      corrupt[random.uniform_int(corrupt.size())] = static_cast<std::byte>(random.uniform_int(256));
    }
    if (random.uniform_int(4) == 0) corrupt.resize(random.uniform_int(corrupt.size() + 1));
    expect_safe_npy(corrupt);
  }
}

// ---- determinism of the synthetic workloads ---------------------------------------------------------------------

std::vector<std::byte> workload_bytes(const Workload& w) {
  const AttentionShape& s = w.shape;
  return serialize_safetensors({LoadedTensor::from_float("q", w.q, {s.tokens, s.query_heads, s.head_dim}),
                                LoadedTensor::from_float("k", w.k, {s.keys, s.kv_heads, s.head_dim}),
                                LoadedTensor::from_float("v", w.v, {s.keys, s.kv_heads, s.value_dim}),
                                LoadedTensor::from_int32("positions", w.positions, {s.tokens})});
}

TEST(SyntheticBytesTest, SameSeedGivesTheSameBytes) {
  SyntheticOptions o;
  o.keys = 300;
  o.tokens = 3;
  o.query_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 16;
  o.value_dim = 8;
  o.seed = 99;
  const std::vector<std::byte> a = workload_bytes(make_synthetic_workload(o));
  const std::vector<std::byte> b = workload_bytes(make_synthetic_workload(o));
  EXPECT_EQ(a, b);
  o.seed = 100;
  EXPECT_NE(a, workload_bytes(make_synthetic_workload(o)));
}

// ---- dumps ------------------------------------------------------------------------------------------------------

Workload small_workload() {
  SyntheticOptions o;
  o.keys = 64;
  o.tokens = 4;
  o.query_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 8;
  o.value_dim = 6;
  o.seed = 5;
  return make_synthetic_workload(o);
}

DumpLayer layer_of(const Workload& w, std::int64_t index, DType dtype) {
  const AttentionShape& s = w.shape;
  DumpLayer layer;
  layer.index = index;
  layer.q = LoadedTensor::from_float("q", w.q, {s.tokens, s.query_heads, s.head_dim}, dtype);
  layer.k = LoadedTensor::from_float("k", w.k, {s.keys, s.kv_heads, s.head_dim}, dtype);
  layer.v = LoadedTensor::from_float("v", w.v, {s.keys, s.kv_heads, s.value_dim}, dtype);
  layer.positions = LoadedTensor::from_int32("positions", w.positions, {s.tokens});
  return layer;
}

TEST(DumpTest, WrittenDumpLoadsBackAsTheSameWorkload) {
  const Workload w = small_workload();
  Dump dump;
  dump.model = "synthetic";
  dump.scale = 0.3;
  dump.layers.push_back(layer_of(w, 0, DType::fp32));
  DumpLayer bf16 = layer_of(w, 7, DType::bf16);
  const std::vector<float> iq = test_values(4 * 3 * 5, 1), ik = test_values(64 * 5, 2), iw = test_values(4 * 3, 3);
  bf16.index_q = LoadedTensor::from_float("iq", iq, {4, 3, 5}, DType::fp8_e4m3);
  bf16.index_k = LoadedTensor::from_float("ik", ik, {64, 5}, DType::fp8_e4m3);
  bf16.index_w = LoadedTensor::from_float("iw", iw, {4, 3});
  dump.layers.push_back(std::move(bf16));
  const fs::path path = temp_path("dump.safetensors");
  write_dump(path, dump);
  const Dump back = load_dump(path);
  fs::remove(path);

  EXPECT_EQ(back.model, "synthetic");
  EXPECT_EQ(back.scale, 0.3);
  EXPECT_EQ(back.metadata.at("format"), kDumpFormat);
  EXPECT_EQ(back.metadata.at("layers"), "0,7");
  ASSERT_EQ(back.layers.size(), 2u);
  const Workload w0 = back.workload(0);
  EXPECT_EQ(w0.q, w.q);
  EXPECT_EQ(w0.k, w.k);
  EXPECT_EQ(w0.v, w.v);
  EXPECT_EQ(w0.positions, w.positions);
  EXPECT_EQ(w0.scale, 0.3);
  EXPECT_EQ(w0.inputs().effective_scale(), 0.3);
  const DumpLayer& l7 = back.layer(7);
  EXPECT_EQ(l7.q.dtype, DType::bf16);
  ASSERT_TRUE(l7.index_q && l7.index_k && l7.index_w);
  EXPECT_FALSE(l7.probabilities);
  EXPECT_EQ(l7.index_k->dtype, DType::fp8_e4m3);
  EXPECT_EQ(l7.index_w->to_float(), iw);
  const Workload w7 = back.workload(1);
  for (std::size_t i = 0; i < w.k.size(); ++i) ASSERT_EQ(w7.k[i], round_to_dtype(w.k[i], DType::bf16));
  EXPECT_NE(w7.name.find("layer 7"), std::string::npos);
  expect_error([&] { (void)back.layer(3); }, {"index", "[0, 7]"});
  expect_error([&] { (void)back.workload(2); });
}

TEST(DumpTest, MlaLatentFormIsMqaWithTheLatentAsValues) {
  // DeepSeek-V3.2's shape, scaled down: q [T, Hq, Dc + Dr] (absorbed), kv_latent [N, Dc], k_rope [N, Dr].
  const std::int64_t T = 6, Hq = 4, N = 80, Dc = 24, Dr = 8;
  SafetensorsFile file;
  file.metadata["format"] = std::string(kDumpFormat);
  const std::vector<float> q = test_values(T * Hq * (Dc + Dr), 11), latent = test_values(N * Dc, 12),
                           rope = test_values(N * Dr, 13);
  file.tensors.push_back(LoadedTensor::from_float("layer3.q", q, {T, Hq, Dc + Dr}, DType::bf16));
  file.tensors.push_back(LoadedTensor::from_float("layer3.kv_latent", latent, {N, Dc}, DType::fp8_e4m3));
  file.tensors.push_back(LoadedTensor::from_float("layer3.k_rope", rope, {N, Dr}, DType::bf16));
  LoadedTensor positions;
  positions.name = "layer3.positions";
  positions.dtype = DType::int32;
  positions.shape = {T};
  positions.data.resize(static_cast<std::size_t>(T * 4));
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int32_t p = static_cast<std::int32_t>(N - T + t);
    std::memcpy(positions.data.data() + t * 4, &p, 4);
  }
  file.tensors.push_back(positions);
  const Dump dump = dump_from_safetensors(file);
  ASSERT_EQ(dump.layers.size(), 1u);
  const AttentionShape shape = dump.layers[0].shape();
  EXPECT_EQ(shape.kv_heads, 1);
  EXPECT_EQ(shape.head_dim, Dc + Dr);
  EXPECT_EQ(shape.value_dim, Dc);
  const Workload w = dump.workload(0);
  for (std::int64_t s = 0; s < N; ++s) {
    for (std::int64_t d = 0; d < Dc; ++d) {
      const float x = round_to_dtype(latent[static_cast<std::size_t>(s * Dc + d)], DType::fp8_e4m3);
      ASSERT_EQ(w.k[static_cast<std::size_t>(s * (Dc + Dr) + d)], x);
      ASSERT_EQ(w.v[static_cast<std::size_t>(s * Dc + d)], x);
    }
    for (std::int64_t d = 0; d < Dr; ++d) {
      ASSERT_EQ(w.k[static_cast<std::size_t>(s * (Dc + Dr) + Dc + d)],
                round_to_dtype(rope[static_cast<std::size_t>(s * Dr + d)], DType::bf16));
    }
  }
  // Studies run on it: exact top-k has recall 1 and the output error of the full selection is 0.
  std::vector<std::unique_ptr<Selector>> selectors;
  selectors.push_back(make_exact_selector());
  StudyOptions options;
  options.k_values = {8, 80};
  const StudyResult result = run_study(w, selectors, options);
  ASSERT_EQ(result.rows.size(), 2u);
  for (const StudyRow& row : result.rows) {
    EXPECT_DOUBLE_EQ(row.metrics.at("recall").mean, 1.0) << row.k;
    if (row.k == 80) EXPECT_NEAR(row.metrics.at("out_err").mean, 0.0, 1e-6);
  }
  // Both forms at once, or half of the MLA form, is refused naming the tensor.
  SafetensorsFile both = file;
  both.tensors.push_back(LoadedTensor::from_float("layer3.v", latent, {N, 1, Dc}));
  expect_error([&] { (void)dump_from_safetensors(both); }, {"layer3.kv_latent", "both"});
  SafetensorsFile half = file;
  half.tensors.erase(half.tensors.begin() + 2);
  expect_error([&] { (void)dump_from_safetensors(half); }, {"layer3.k_rope", "missing"});
}

TEST(DumpTest, InconsistentDumpsThrowNamingTheTensor) {
  const Workload w = small_workload();
  const auto with = [&](auto&& edit) {
    std::vector<LoadedTensor> tensors;
    DumpLayer l = layer_of(w, 2, DType::fp32);
    for (LoadedTensor* t : {&l.q, &l.k, &l.v, &l.positions}) {
      LoadedTensor copy = *t;
      copy.name = "layer2." + t->name;
      tensors.push_back(copy);
    }
    SafetensorsFile file;
    file.metadata = {{"format", std::string(kDumpFormat)}};
    file.tensors = tensors;
    edit(file);
    return dump_from_safetensors(std::move(file), "d.safetensors");
  };
  EXPECT_NO_THROW(with([](SafetensorsFile&) {}));
  expect_error([&] { with([](SafetensorsFile& f) { f.tensors.erase(f.tensors.begin() + 2); }); },
               {"d.safetensors", "layer2.v", "missing"});
  expect_error([&] { with([](SafetensorsFile& f) { f.tensors.clear(); }); }, {"found none"});
  expect_error([&] { with([](SafetensorsFile& f) { f.metadata["format"] = "other/2"; }); }, {"other/2"});
  expect_error([&] { with([](SafetensorsFile& f) { f.metadata["scale"] = "0.1x"; }); }, {"scale", "0.1x"});
  expect_error([&] { with([](SafetensorsFile& f) { f.metadata["scale"] = "nan"; }); }, {"scale"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors[1].shape = {32, 4, 4};
          f.tensors[1].name = "layer2.k";
        });
      },
      {"layer2.k", "dimension 2 = 8"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors[1] = LoadedTensor::from_float("layer2.k", std::vector<float>(64 * 3 * 8), {64, 3, 8});
        });
      },
      {"layer2.k", "Hkv dividing Hq = 4"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors[2] = LoadedTensor::from_float("layer2.v", std::vector<float>(63 * 2 * 6), {63, 2, 6});
        });
      },
      {"layer2.v", "N of k"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors[3] = LoadedTensor::from_int32("layer2.positions", std::vector<std::int32_t>{1, 2, -3, 4}, {4});
        });
      },
      {"layer2.positions", ">= 0", "-3"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors[3] = LoadedTensor::from_int32("layer2.positions", std::vector<std::int32_t>{1, 2, 3}, {3});
        });
      },
      {"layer2.positions", "T = 4"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors[0] = LoadedTensor::from_int32("layer2.q", std::vector<std::int32_t>(4 * 4 * 8), {4, 4, 8});
        });
      },
      {"layer2.q", "floating"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors.push_back(LoadedTensor::from_float("layer2.probs", std::vector<float>(4 * 4 * 63), {4, 4, 63}));
        });
      },
      {"layer2.probs", "N of k"});
  expect_error(
      [&] {
        with([](SafetensorsFile& f) {
          f.tensors.push_back(LoadedTensor::from_float("layer2.index_q", std::vector<float>(4 * 2 * 3), {4, 2, 3}));
          f.tensors.push_back(LoadedTensor::from_float("layer2.index_k", std::vector<float>(64 * 5), {64, 5}));
        });
      },
      {"layer2.index_k", "DI of index_q"});
  // Other tensors are ignored.
  EXPECT_NO_THROW(with([](SafetensorsFile& f) {
    f.tensors.push_back(LoadedTensor::from_float("lm_head", std::vector<float>{1}, {1}));
  }));
}

// ---- the dump tools/capture_dump.py wrote from a randomly initialised transformers Llama -----------------------

/// Max |p_dump - p_keysel| over all (t, h, s), with keysel's double-precision attention probabilities.
double max_probability_difference(const Workload& w, const LoadedTensor& model_probs, Granularity granularity) {
  const AttentionShape& s = w.shape;
  const std::int64_t groups = group_count(granularity, s.query_heads, s.kv_heads);
  std::vector<double> pbar(static_cast<std::size_t>(s.tokens * groups * s.keys));
  group_probabilities(w.inputs(), granularity, TensorView(pbar.data(), DType::fp64, {s.tokens, groups, s.keys}));
  const std::vector<float> p = model_probs.to_float();  // [T, Hq, N]
  double worst = 0;
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    for (std::int64_t g = 0; g < groups; ++g) {
      const HeadRange heads = heads_of_group(granularity, g, s.query_heads, s.kv_heads);
      for (std::int64_t key = 0; key < s.keys; ++key) {
        double mean = 0;
        for (std::int64_t h = heads.first; h < heads.first + heads.count; ++h)
          mean += p[static_cast<std::size_t>((t * s.query_heads + h) * s.keys + key)];
        mean /= static_cast<double>(heads.count);
        worst = std::max(worst, std::abs(mean - pbar[static_cast<std::size_t>((t * groups + g) * s.keys + key)]));
      }
    }
  }
  return worst;
}

TEST(CapturedDumpTest, TinyLlamaDumpMatchesTheModelsAttention) {
  const Dump dump = load_dump(data_dir() / "tiny_llama_dump.safetensors");
  EXPECT_EQ(dump.model, "tiny-random-llama");
  EXPECT_EQ(dump.scale, 0.25);
  EXPECT_EQ(dump.metadata.at("prefill_tokens"), "24");
  EXPECT_EQ(dump.metadata.at("decode_tokens"), "8");
  ASSERT_EQ(dump.layers.size(), 2u);
  for (std::size_t i = 0; i < dump.layers.size(); ++i) {
    SCOPED_TRACE(i);
    const DumpLayer& layer = dump.layers[i];
    EXPECT_EQ(layer.index, static_cast<std::int64_t>(i));
    EXPECT_EQ(layer.q.dtype, DType::fp32);
    EXPECT_EQ(layer.q.shape, (std::vector<std::int64_t>{32, 4, 16}));
    EXPECT_EQ(layer.k.shape, (std::vector<std::int64_t>{32, 2, 16}));
    EXPECT_EQ(layer.v.shape, (std::vector<std::int64_t>{32, 2, 16}));
    ASSERT_TRUE(layer.probabilities.has_value());
    const Workload w = dump.workload(i);
    for (std::int32_t t = 0; t < 32; ++t) EXPECT_EQ(w.positions[static_cast<std::size_t>(t)], t);
    // The model's probabilities are a causal distribution per (t, h)...
    const std::vector<float> p = layer.probabilities->to_float();
    for (std::int64_t t = 0; t < 32; ++t) {
      for (std::int64_t h = 0; h < 4; ++h) {
        double sum = 0;
        for (std::int64_t s = 0; s < 32; ++s) {
          const float x = p[static_cast<std::size_t>((t * 4 + h) * 32 + s)];
          EXPECT_GE(x, 0.0f);
          if (s > t) {
            EXPECT_EQ(x, 0.0f);
          }
          sum += x;
        }
        EXPECT_NEAR(sum, 1.0, 1e-5);
      }
    }
    // ...and softmax(scale q.k) of the captured post-RoPE q and k reproduces them, per head and per key head.
    EXPECT_LT(max_probability_difference(w, *layer.probabilities, Granularity::per_head), 1e-5);
    EXPECT_LT(max_probability_difference(w, *layer.probabilities, Granularity::per_kv_head), 1e-5);
  }
}

TEST(CapturedDumpTest, TinyLlamaBf16DecodeDump) {
  const Dump dump = load_dump(data_dir() / "tiny_llama_dump_bf16_decode.safetensors");
  EXPECT_EQ(dump.metadata.at("queries"), "decode");
  ASSERT_EQ(dump.layers.size(), 2u);
  for (std::size_t i = 0; i < dump.layers.size(); ++i) {
    const DumpLayer& layer = dump.layers[i];
    EXPECT_EQ(layer.q.dtype, DType::bf16);
    EXPECT_EQ(layer.q.shape, (std::vector<std::int64_t>{8, 4, 16}));
    EXPECT_EQ(layer.k.shape, (std::vector<std::int64_t>{32, 2, 16}));
    const Workload w = dump.workload(i);
    for (std::int32_t t = 0; t < 8; ++t) EXPECT_EQ(w.positions[static_cast<std::size_t>(t)], 24 + t);
    // q and k were rounded to bf16 after the model's fp32 attention: agreement to bf16 precision.
    EXPECT_LT(max_probability_difference(w, *layer.probabilities, Granularity::per_head), 1e-2);
  }
}

}  // namespace
}  // namespace keysel

namespace keysel {
namespace {

std::uint64_t fnv1a(std::span<const std::byte> bytes) {
  std::uint64_t h = 1469598103934665603ull;
  for (const std::byte b : bytes) h = (h ^ static_cast<std::uint64_t>(b)) * 1099511628211ull;
  return h;
}

SyntheticOptions realism_options() {
  SyntheticOptions o;
  o.keys = 1024;
  o.tokens = 4;
  o.query_heads = 8;
  o.kv_heads = 2;
  o.head_dim = 32;
  o.value_dim = 16;
  o.seed = 3;
  return o;
}

TEST(SyntheticRealismTest, DefaultsGiveTheSameBitsAsBeforeTheKnobs) {
  // Pinned with the generator as it was before the realism knobs existed.
  EXPECT_EQ(fnv1a(workload_bytes(make_synthetic_workload(realism_options()))), 9937648199301302004ull);
}

std::vector<double> pbar_of(const Workload& w) {
  const AttentionShape& s = w.shape;
  std::vector<double> pbar(static_cast<std::size_t>(s.tokens * s.kv_heads * s.keys));
  group_probabilities(w.inputs(), Granularity::per_kv_head,
                      TensorView(pbar.data(), DType::fp64, {s.tokens, s.kv_heads, s.keys}));
  return pbar;
}

double max_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

TEST(SyntheticRealismTest, EachKnobIsSeededAndPrintsWhatItGives) {
  const SyntheticOptions base = realism_options();
  const std::vector<std::byte> plain = workload_bytes(make_synthetic_workload(base));
  std::vector<SyntheticOptions> variants(6, base);
  variants[0].rope_base = 10000;
  variants[1].outlier_channels = 3, variants[1].outlier_scale = 20;
  variants[2].key_rank = 8;
  variants[3].key_shift = 2;
  variants[4].temperature = 2;
  variants[5].rope_base = 500000, variants[5].key_rank = 12, variants[5].key_shift = 1,
  variants[5].outlier_channels = 2, variants[5].outlier_scale = 8, variants[5].temperature = 0.7;
  for (const SyntheticOptions& o : variants) {
    const Workload w = make_synthetic_workload(o);
    SCOPED_TRACE(w.name);
    const std::vector<std::byte> bytes = workload_bytes(w);
    EXPECT_NE(bytes, plain);
    EXPECT_EQ(bytes, workload_bytes(make_synthetic_workload(o)));
    SyntheticOptions other = o;
    other.seed += 1;
    EXPECT_NE(bytes, workload_bytes(make_synthetic_workload(other)));
    std::cout << w.name << "\n  ";
    print_workload_properties(measure_workload(w, Granularity::per_kv_head, {16, 64}), std::cout);
  }
}

TEST(SyntheticRealismTest, ShiftAndOutliersLeaveAttentionUnchanged) {
  const SyntheticOptions base = realism_options();
  const Workload plain = make_synthetic_workload(base);
  SyntheticOptions o = base;
  o.key_shift = 3;
  o.outlier_channels = 4;
  o.outlier_scale = 30;
  const Workload shifted = make_synthetic_workload(o);
  EXPECT_LT(max_difference(pbar_of(plain), pbar_of(shifted)), 2e-3);
  const WorkloadProperties a = measure_workload(plain), b = measure_workload(shifted);
  EXPECT_GT(b.max_abs_key, 5 * a.max_abs_key);
  EXPECT_GT(b.key_norm, 2 * a.key_norm);
  // Keys moved away from queries: the mean key is far from the origin.
  double mean_norm2 = 0;
  for (std::int64_t d = 0; d < plain.shape.head_dim; ++d) {
    double mean = 0;
    for (std::int64_t s = 0; s < plain.shape.keys; ++s) mean += shifted.k[static_cast<std::size_t>((s * 2) * 32 + d)];
    mean /= static_cast<double>(plain.shape.keys);
    mean_norm2 += mean * mean;
  }
  EXPECT_GT(std::sqrt(mean_norm2), 2.0 * std::sqrt(32.0));
}

TEST(SyntheticRealismTest, TemperatureRaisesEntropy) {
  SyntheticOptions o = realism_options();
  double previous = -1;
  for (const double temperature : {0.5, 1.0, 2.0, 4.0}) {
    o.temperature = temperature;
    const WorkloadProperties p = measure_workload(make_synthetic_workload(o));
    EXPECT_GT(p.entropy, previous) << "temperature " << temperature;
    EXPECT_GT(p.entropy_normalized, 0.0);
    EXPECT_LE(p.entropy_normalized, 1.0);
    previous = p.entropy;
  }
}

TEST(SyntheticRealismTest, LowRankKeysSpanRChannels) {
  SyntheticOptions o = realism_options();
  o.key_rank = 6;
  const Workload w = make_synthetic_workload(o);
  const std::int64_t D = 32, Hkv = 2;
  // Orthonormalise keys 1..r of key head 1; every later key must lie in their span.
  std::vector<std::vector<double>> span;
  double worst = 0;
  for (std::int64_t s = 1; s < 200; ++s) {
    std::vector<double> x(static_cast<std::size_t>(D));
    for (std::int64_t d = 0; d < D; ++d)
      x[static_cast<std::size_t>(d)] = w.k[static_cast<std::size_t>((s * Hkv + 1) * D + d)];
    double norm2 = 0;
    for (const double v : x) norm2 += v * v;
    for (const auto& b : span) {
      double dot = 0;
      for (std::int64_t d = 0; d < D; ++d) dot += b[static_cast<std::size_t>(d)] * x[static_cast<std::size_t>(d)];
      for (std::int64_t d = 0; d < D; ++d) x[static_cast<std::size_t>(d)] -= dot * b[static_cast<std::size_t>(d)];
    }
    double residual2 = 0;
    for (const double v : x) residual2 += v * v;
    if (static_cast<std::int64_t>(span.size()) < o.key_rank) {
      for (double& v : x) v /= std::sqrt(residual2);
      span.push_back(x);
    } else {
      worst = std::max(worst, std::sqrt(residual2 / norm2));
    }
  }
  EXPECT_LT(worst, 1e-5);
}

TEST(SyntheticRealismTest, RopeRotatesKeysByPosition) {
  SyntheticOptions o = realism_options();
  const Workload plain = make_synthetic_workload(o);
  o.rope_base = 10000;
  const Workload rotated = make_synthetic_workload(o);
  const std::int64_t D = 32;
  for (const std::int64_t s : {1, 7, 500, 1023}) {
    // Same normals, rotated: the norm of each key is kept, the key itself is not (position 0 is not rotated).
    double n_plain = 0, n_rotated = 0, diff = 0;
    for (std::int64_t d = 0; d < D; ++d) {
      const auto i = static_cast<std::size_t>((s * 2) * D + d);
      n_plain += static_cast<double>(plain.k[i]) * plain.k[i];
      n_rotated += static_cast<double>(rotated.k[i]) * rotated.k[i];
      diff += std::abs(plain.k[i] - rotated.k[i]);
    }
    EXPECT_NEAR(std::sqrt(n_rotated), std::sqrt(n_plain), 1e-4 * std::sqrt(n_plain)) << s;
    EXPECT_GT(diff, 1e-3) << s;
  }
  // Channel pair 0 of the key turns by s radians relative to position 0: check its angle directly.
  const std::int64_t s = 3;
  const auto at = [&](const Workload& w, std::int64_t d) {
    return static_cast<double>(w.k[static_cast<std::size_t>((s * 2) * D + d)]);
  };
  const double angle_plain = std::atan2(at(plain, 16), at(plain, 0));
  const double angle_rotated = std::atan2(at(rotated, 16), at(rotated, 0));
  EXPECT_NEAR(std::remainder(angle_rotated - angle_plain - 3.0, 2 * M_PI), 0.0, 1e-4);
  // The exact top-k still captures much of the attention: structure survives the rotation.
  const WorkloadProperties p = measure_workload(rotated, Granularity::per_kv_head, {64});
  EXPECT_GT(p.topk_mass[0], 0.3);
}

TEST(SyntheticRealismTest, DefaultWorkloadPropertiesAreAsDocumented) {
  const WorkloadProperties p =
      measure_workload(make_synthetic_workload(SyntheticOptions{}), Granularity::per_kv_head, {64, 256, 1024});
  print_workload_properties(p, std::cout);
  EXPECT_NEAR(p.entropy_normalized, 0.58, 0.05);
  EXPECT_NEAR(p.topk_mass[0], 0.60, 0.06);
  EXPECT_GT(p.topk_mass[2], p.topk_mass[1]);
  EXPECT_GT(p.topk_mass[1], p.topk_mass[0]);
  EXPECT_NEAR(p.sink_mass, 0.25 * p.topk_mass[0], 0.1);
  std::ostringstream text;
  print_workload_properties(p, text);
  EXPECT_NE(text.str().find("top-64 mass"), std::string::npos);
}

TEST(SyntheticRealismTest, BadKnobsThrow) {
  SyntheticOptions o = realism_options();
  const auto with = [&](auto&& edit) {
    SyntheticOptions x = o;
    edit(x);
    return make_synthetic_workload(x);
  };
  expect_error([&] { with([](SyntheticOptions& x) { x.rope_base = -1; }); }, {"rope_base"});
  expect_error([&] { with([](SyntheticOptions& x) { x.key_rank = 33; }); }, {"key_rank", "head_dim = 32"});
  expect_error([&] { with([](SyntheticOptions& x) { x.outlier_channels = -1; }); }, {"outlier_channels"});
  expect_error([&] { with([](SyntheticOptions& x) { x.outlier_scale = 0; }); }, {"outlier_scale"});
  expect_error([&] { with([](SyntheticOptions& x) { x.key_shift = std::nan(""); }); }, {"key_shift"});
  expect_error([&] { with([](SyntheticOptions& x) { x.temperature = 0; }); }, {"temperature"});
}

}  // namespace
}  // namespace keysel
