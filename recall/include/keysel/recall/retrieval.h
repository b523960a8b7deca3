// A retrieval task for the tiny language model: prompts that plant keys in a long text and end asking for one
// of them, each followed by its answer (docs/studies.md, "Task mode"). Two files in one directory:
//
//   retrieval.json  {"format": "keysel-retrieval/1", "data": "retrieval.bin", "question": "definition",
//                    "examples": [{"offset": 0, "length": 8192, "answer_length": 8, "keys": 4, "depth": 0.5,
//                                  "context": 8192}, ...]}
//   retrieval.bin   the bytes of every example (its prompt, then its answer), one after another
//
// "question" (optional; absent means "assert") names how the prompt's last line asks for the key: "definition"
// (`TOKEN_<id> = "`) or "assert" (`assert TOKEN_<id> == "`). An example is bytes [offset, offset + length) of the
// data file; its answer is the last answer_length of them.
// The model answers it exactly when, teacher-forced, its argmax next-byte prediction at every answer byte is
// that byte (the same as greedy decoding).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace keysel {

/// The format string retrieval.json carries under "format".
inline constexpr std::string_view kRetrievalFormat = "keysel-retrieval/1";

struct RetrievalExample {
  std::int64_t offset = 0;         // byte offset in the data file
  std::int64_t length = 0;         // prompt + answer bytes, >= answer_length + 1
  std::int64_t answer_length = 0;  // >= 1
  std::int64_t keys = 0;           // keys planted in the prompt, >= 1
  double depth = 0;                // where the asked key sits in the prompt, a fraction in [0, 1]
  std::int64_t context = 0;        // the context length the example was built for, >= 1
};

struct RetrievalSet {
  std::string source;  // the retrieval.json read
  std::string question = "assert";  // the question form: "definition" or "assert"
  std::vector<RetrievalExample> examples;
  std::vector<std::uint8_t> data;  // the data file

  /// The bytes of example i (prompt and answer).
  std::span<const std::uint8_t> bytes(std::size_t i) const;
};

/// Parses retrieval.json's text against the data file's bytes. Examples must lie inside the data and not
/// overlap; `max_length` > 0 bounds every example's length (the model's context). Throws keysel::Error naming
/// `source`, the example and the field on malformed input (wrong format, missing or non-integer fields, offsets
/// out of range or overlapping, answer_length >= length, length above max_length, a question form other than
/// "definition" or "assert").
RetrievalSet parse_retrieval_set(std::string_view json_text, std::vector<std::uint8_t> data, std::string_view source,
                                 std::int64_t max_length = 0);
/// Reads <directory>/retrieval.json and the data file it names (a file name in the same directory).
RetrievalSet load_retrieval_set(const std::string& directory, std::int64_t max_length = 0);

}  // namespace keysel
