// The retrieval task's files (retrieval.h): retrieval.json and the data file it names.
#include "keysel/recall/retrieval.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>

#include "keysel/recall/loaders.h"
#include "loaders/loader_support.h"

namespace keysel {
namespace {

constexpr std::string_view kFunction = "load_retrieval_set";
using nlohmann::json;

[[noreturn]] void fail(std::string_view source, const std::string& what) {
  detail::throw_file_error(kFunction, source, "", what);
}

std::int64_t integer_field(std::string_view source, const json& example, std::size_t index, const char* key,
                           std::int64_t min_value) {
  const std::string where = "examples[" + std::to_string(index) + "]." + key;
  const auto it = example.find(key);
  if (it == example.end()) fail(source, where + ": missing");
  if (!it->is_number_integer()) fail(source, where + ": expected an integer, got " + it->dump());
  if (it->is_number_unsigned() &&
      it->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    fail(source, where + ": expected an int64, got " + it->dump());
  }
  const auto value = it->get<std::int64_t>();
  if (value < min_value) fail(source, where + ": expected >= " + std::to_string(min_value) + ", got " + it->dump());
  return value;
}

}  // namespace

std::span<const std::uint8_t> RetrievalSet::bytes(std::size_t i) const {
  const RetrievalExample& e = examples.at(i);
  return std::span<const std::uint8_t>(data).subspan(static_cast<std::size_t>(e.offset),
                                                      static_cast<std::size_t>(e.length));
}

RetrievalSet parse_retrieval_set(std::string_view json_text, std::vector<std::uint8_t> data, std::string_view source,
                                 std::int64_t max_length) {
  if (detail::json_nesting_depth(json_text) > detail::kMaxJsonDepth) {
    fail(source, "JSON nested deeper than " + std::to_string(detail::kMaxJsonDepth) + " levels");
  }
  const json doc = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) fail(source, "not valid JSON");
  if (!doc.is_object()) fail(source, "expected a JSON object, got " + doc.dump().substr(0, 80));
  for (const auto& [key, value] : doc.items()) {
    if (key != "format" && key != "data" && key != "question" && key != "examples") {
      fail(source, "unknown key '" + key + "' (expected format, data, question, examples)");
    }
  }
  const auto format = doc.find("format");
  if (format == doc.end() || !format->is_string() || format->get<std::string>() != kRetrievalFormat) {
    fail(source, "format: expected \"" + std::string(kRetrievalFormat) + "\", got " +
                     (format == doc.end() ? std::string("nothing") : format->dump()));
  }
  if (const auto name = doc.find("data"); name != doc.end() && (!name->is_string() || name->get<std::string>().empty())) {
    fail(source, "data: expected the data file's name, got " + name->dump().substr(0, 80));
  }
  const auto examples = doc.find("examples");
  if (examples == doc.end() || !examples->is_array() || examples->empty()) {
    fail(source, "examples: expected a non-empty array, got " +
                     (examples == doc.end() ? std::string("nothing") : examples->dump().substr(0, 80)));
  }
  RetrievalSet set;
  set.source = std::string(source);
  if (const auto question = doc.find("question"); question != doc.end()) {
    if (!question->is_string() ||
        (question->get<std::string>() != "definition" && question->get<std::string>() != "assert")) {
      fail(source, "question: expected \"definition\" or \"assert\", got " + question->dump().substr(0, 80));
    }
    set.question = question->get<std::string>();
  }
  const auto data_size = static_cast<std::int64_t>(data.size());
  for (std::size_t i = 0; i < examples->size(); ++i) {
    const json& e = (*examples)[i];
    const std::string where = "examples[" + std::to_string(i) + "]";
    if (!e.is_object()) fail(source, where + ": expected a JSON object, got " + e.dump().substr(0, 80));
    for (const auto& [key, value] : e.items()) {
      if (key != "offset" && key != "length" && key != "answer_length" && key != "keys" && key != "depth" &&
          key != "context") {
        fail(source, where + ": unknown key '" + key + "' (expected offset, length, answer_length, keys, depth, "
                             "context)");
      }
    }
    RetrievalExample x;
    x.offset = integer_field(source, e, i, "offset", 0);
    x.length = integer_field(source, e, i, "length", 2);
    x.answer_length = integer_field(source, e, i, "answer_length", 1);
    x.keys = integer_field(source, e, i, "keys", 1);
    x.context = integer_field(source, e, i, "context", 1);
    const auto depth = e.find("depth");
    if (depth == e.end()) fail(source, where + ".depth: missing");
    if (!depth->is_number() || !std::isfinite(depth->get<double>()) || depth->get<double>() < 0 ||
        depth->get<double>() > 1) {
      fail(source, where + ".depth: expected a number in [0, 1], got " + depth->dump());
    }
    x.depth = depth->get<double>();
    if (x.answer_length >= x.length) {
      fail(source, where + ".answer_length: expected < length = " + std::to_string(x.length) +
                       " (a prompt of at least one byte), got " + std::to_string(x.answer_length));
    }
    if (max_length > 0 && x.length > max_length) {
      fail(source, where + ".length: expected <= " + std::to_string(max_length) + " (the model's context), got " +
                       std::to_string(x.length));
    }
    // offset + length <= size, without forming a sum that could overflow.
    if (x.offset > data_size || x.length > data_size - x.offset) {
      fail(source, where + ": bytes [" + std::to_string(x.offset) + ", offset + " + std::to_string(x.length) +
                       ") reach past the end of the data (" + std::to_string(data_size) + " bytes)");
    }
    set.examples.push_back(x);
  }
  std::vector<std::size_t> order(set.examples.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return set.examples[a].offset < set.examples[b].offset; });
  for (std::size_t j = 1; j < order.size(); ++j) {
    const RetrievalExample& a = set.examples[order[j - 1]];
    const RetrievalExample& b = set.examples[order[j]];
    if (b.offset - a.offset < a.length) {
      fail(source, "examples[" + std::to_string(order[j - 1]) + "] and examples[" + std::to_string(order[j]) +
                       "] overlap (bytes from " + std::to_string(a.offset) + " and " + std::to_string(b.offset) +
                       ")");
    }
  }
  set.data = std::move(data);
  return set;
}

RetrievalSet load_retrieval_set(const std::string& directory, std::int64_t max_length) {
  const std::filesystem::path json_path = std::filesystem::path(directory) / "retrieval.json";
  const std::vector<std::byte> text = detail::read_file_bytes(kFunction, json_path);
  const std::string_view json_text(reinterpret_cast<const char*>(text.data()), text.size());
  // The data file's name, checked before it is read: a plain file name in the same directory.
  std::string data_name = "retrieval.bin";
  if (detail::json_nesting_depth(json_text) <= detail::kMaxJsonDepth) {
    const json doc = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
    if (doc.is_object() && doc.contains("data")) {
      const json& name = doc["data"];
      if (!name.is_string() || name.get<std::string>().empty() ||
          std::filesystem::path(name.get<std::string>()).filename() != name.get<std::string>() ||
          name.get<std::string>() == "." || name.get<std::string>() == "..") {
        fail(json_path.string(), "data: expected a file name in the same directory, got " + name.dump());
      }
      data_name = name.get<std::string>();
    }
  }
  const std::vector<std::byte> bytes = detail::read_file_bytes(kFunction, std::filesystem::path(directory) / data_name);
  std::vector<std::uint8_t> data(bytes.size());
  std::transform(bytes.begin(), bytes.end(), data.begin(), [](std::byte b) { return static_cast<std::uint8_t>(b); });
  return parse_retrieval_set(json_text, std::move(data), json_path.string(), max_length);
}

}  // namespace keysel
