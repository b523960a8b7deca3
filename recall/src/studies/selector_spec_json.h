// Internal: the nlohmann::json side of selector specs, shared by study configs and the tuner.
#pragma once

#include <memory>

#include <nlohmann/json.hpp>

#include "keysel/indexer/selector.h"
#include "keysel/recall/selector_spec.h"

namespace keysel::detail {

/// Builds a selector from a parsed spec object (see selector_spec.h); `where` prefixes error messages
/// ("selectors[2]"); `indexer`, when not null, holds the attention's trained indexer tensors.
std::unique_ptr<Selector> make_selector(const nlohmann::json& spec, const std::string& where = "selector spec",
                                        const IndexerTensors* indexer = nullptr);
/// The name a spec's selector reports (what make_selector(spec)->name() gives), also for specs that can only be
/// built over a workload's indexer tensors (a "faiss" spec with "rerank": "indexer").
std::string selector_default_name(const nlohmann::json& spec, const std::string& where = "selector spec");
/// Checks a spec without building it (types, keys, values).
void check_selector_spec(const nlohmann::json& spec, const std::string& where = "selector spec");
/// Parses JSON text, turning parse errors (and nesting deeper than kMaxJsonDepth, and numbers no double holds)
/// into keysel::Error naming `what`.
nlohmann::json parse_json_text(std::string_view text, const std::string& what);
/// The bytes of a text file; keysel::Error of `function` naming the path when it is a directory or unreadable.
std::string read_text_file(const std::string& path, std::string_view function);

}  // namespace keysel::detail
