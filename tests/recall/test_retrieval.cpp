// The retrieval task's files (retrieval.h): a well-formed set loads; every malformed or hostile field is a
// keysel::Error naming the file, the example and the field.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "keysel/core/error.h"
#include "keysel/recall/retrieval.h"

namespace keysel {
namespace {

namespace fs = std::filesystem;

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

std::vector<std::uint8_t> data_of(std::size_t n) {
  std::vector<std::uint8_t> data(n);
  for (std::size_t i = 0; i < n; ++i) data[i] = static_cast<std::uint8_t>('a' + i % 26);
  return data;
}

std::string example(const std::string& offset, const std::string& length, const std::string& answer = "8",
                    const std::string& extra = "") {
  return "{\"offset\": " + offset + ", \"length\": " + length + ", \"answer_length\": " + answer +
         ", \"keys\": 4, \"depth\": 0.25, \"context\": 64" + extra + "}";
}

std::string document(const std::string& examples, const std::string& format = "\"keysel-retrieval/1\"") {
  return "{\"format\": " + format + ", \"data\": \"retrieval.bin\", \"examples\": [" + examples + "]}";
}

TEST(Retrieval, AWellFormedSetLoads) {
  const RetrievalSet set =
      parse_retrieval_set(document(example("40", "30") + ", " + example("0", "40", "3")), data_of(100), "r.json", 64);
  ASSERT_EQ(set.examples.size(), 2u);
  EXPECT_EQ(set.examples[0].offset, 40);
  EXPECT_EQ(set.examples[1].answer_length, 3);
  EXPECT_EQ(set.examples[0].keys, 4);
  EXPECT_DOUBLE_EQ(set.examples[0].depth, 0.25);
  EXPECT_EQ(set.examples[0].context, 64);
  const auto bytes = set.bytes(0);
  ASSERT_EQ(bytes.size(), 30u);
  EXPECT_EQ(bytes[0], static_cast<std::uint8_t>('a' + 40 % 26));
  EXPECT_EQ(set.question, "assert");  // files without the field
  const std::string with_question = document(example("0", "40")).insert(1, "\"question\": \"definition\", ");
  EXPECT_EQ(parse_retrieval_set(with_question, data_of(100), "r.json").question, "definition");
  // Touching examples are not an overlap; the data may hold more than the examples.
  EXPECT_NO_THROW(parse_retrieval_set(document(example("0", "10") + ", " + example("10", "10")), data_of(25), "r"));
}

TEST(Retrieval, MalformedInputNamesTheFileExampleAndField) {
  const auto data = data_of(100);
  const auto parse = [&](const std::string& text, std::int64_t max_length = 64) {
    return parse_retrieval_set(text, data, "set/retrieval.json", max_length);
  };
  expect_error([&] { parse(document(example("0", "10"), "\"keysel-retrieval/2\"")); },
               {"load_retrieval_set", "set/retrieval.json", "format", "keysel-retrieval/1"});
  expect_error([&] { parse(document(example("0", "10"), "1")); }, {"format"});
  expect_error([&] { parse("{\"format\": \"keysel-retrieval/1\"}"); }, {"examples"});
  expect_error([&] { parse(document("")); }, {"examples", "non-empty"});
  expect_error([&] { parse("[1, 2]"); }, {"JSON object"});
  expect_error([&] { parse("{\"format\": "); }, {"not valid JSON"});
  expect_error([&] { parse(std::string(1000, '[') + std::string(1000, ']')); }, {"nested deeper"});
  expect_error([&] { parse(document(example("0", "10")).insert(1, "\"extra\": 1, ")); }, {"unknown key 'extra'"});
  expect_error([&] { parse(document(example("0", "10")).insert(1, "\"question\": \"ask\", ")); },
               {"question", "\"definition\" or \"assert\"", "ask"});
  expect_error([&] { parse(document(example("0", "10")).insert(1, "\"question\": 1, ")); }, {"question"});
  expect_error([&] { parse(document(example("0", "10", "8", ", \"note\": 1"))); }, {"examples[0]", "'note'"});
  // Fields: missing, not numbers, not integers, negative, out of their range.
  expect_error([&] { parse(document("{\"offset\": 0}")); }, {"examples[0].length", "missing"});
  expect_error([&] { parse(document(example("\"0\"", "10"))); }, {"examples[0].offset", "an integer"});
  expect_error([&] { parse(document(example("0", "10.5"))); }, {"examples[0].length", "an integer"});
  expect_error([&] { parse(document(example("-1", "10"))); }, {"examples[0].offset", ">= 0"});
  expect_error([&] { parse(document(example("0", "10", "null"))); }, {"examples[0].answer_length"});
  expect_error([&] { parse(document(example("0", "10", "0"))); }, {"examples[0].answer_length", ">= 1"});
  expect_error([&] { parse(document(example("0", "8", "8"))); }, {"examples[0].answer_length", "< length = 8"});
  expect_error([&] { parse(document(example("0", "65"))); }, {"examples[0].length", "<= 64", "context"});
  EXPECT_NO_THROW(parse(document(example("0", "65")), 0));  // no bound given
  // Offsets out of range, including sums that would overflow int64, and values past int64.
  expect_error([&] { parse(document(example("95", "10"))); }, {"examples[0]", "past the end", "100 bytes"});
  expect_error([&] { parse(document(example("101", "10"))); }, {"past the end"});
  expect_error([&] { parse(document(example(std::to_string(std::numeric_limits<std::int64_t>::max()), "10"))); },
               {"past the end"});
  expect_error([&] { parse(document(example("0", std::to_string(std::numeric_limits<std::int64_t>::max())))); },
               {"examples[0].length"});
  expect_error([&] { parse(document(example("18446744073709551615", "10"))); }, {"examples[0].offset", "int64"});
  // Overlapping examples, in any order.
  expect_error([&] { parse(document(example("50", "20") + ", " + example("0", "10") + ", " + example("45", "10"))); },
               {"examples[2] and examples[0] overlap"});
}

TEST(Retrieval, DepthMustBeAFraction) {
  const auto data = data_of(100);
  const auto with_depth = [&](const std::string& depth) {
    const std::string e = "{\"offset\": 0, \"length\": 10, \"answer_length\": 2, \"keys\": 1, \"depth\": " + depth +
                          ", \"context\": 10}";
    return parse_retrieval_set(document(e), data, "r.json");
  };
  EXPECT_NO_THROW(with_depth("0"));
  EXPECT_NO_THROW(with_depth("1"));
  expect_error([&] { with_depth("1.5"); }, {"examples[0].depth", "[0, 1]"});
  expect_error([&] { with_depth("-0.1"); }, {"examples[0].depth"});
  expect_error([&] { with_depth("\"half\""); }, {"examples[0].depth"});
}

TEST(Retrieval, LoadsFromADirectoryAndRefusesDataOutsideIt) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("keysel_retrieval_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name, std::ios::binary) << text;
  };
  std::string bin;
  for (int i = 0; i < 50; ++i) bin += static_cast<char>('A' + i % 26);
  write("retrieval.bin", bin);
  write("retrieval.json", document(example("0", "20", "4") + ", " + example("20", "30", "4")));
  const RetrievalSet set = load_retrieval_set(dir.string(), 64);
  ASSERT_EQ(set.examples.size(), 2u);
  EXPECT_EQ(set.bytes(1)[0], static_cast<std::uint8_t>('A' + 20));
  expect_error([&] { load_retrieval_set(dir.string(), 25); }, {"examples[1].length", "<= 25"});
  write("retrieval.json", "{\"format\": \"keysel-retrieval/1\", \"data\": \"../retrieval.bin\", \"examples\": [" +
                              example("0", "20") + "]}");
  expect_error([&] { load_retrieval_set(dir.string()); }, {"data", "same directory"});
  write("retrieval.json", "{\"format\": \"keysel-retrieval/1\", \"data\": \"missing.bin\", \"examples\": [" +
                              example("0", "20") + "]}");
  expect_error([&] { load_retrieval_set(dir.string()); }, {"missing.bin"});
  expect_error([&] { load_retrieval_set((dir / "nowhere").string()); }, {"retrieval.json"});
  fs::remove_all(dir);
}

}  // namespace
}  // namespace keysel
