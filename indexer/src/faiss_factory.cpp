// The factory-string grammar of faiss_factory.h: a hand-written parser, so that every number is read, bounded and
// reported before FAISS's own parser (which trusts it) runs.
#include "faiss_factory.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <limits>
#include <string>
#include <utility>

#include "keysel/core/error.h"

namespace keysel::detail {
namespace {

constexpr std::array<std::string_view, 4> kScalarQuantizers = {"SQ4", "SQ6", "SQ8", "SQfp16"};

/// A number read from the string: its digits as written (for messages) and its value, saturated so that a
/// 40-digit count reads as "too large" instead of overflowing.
struct Number {
  std::string_view digits;
  std::int64_t value = 0;
};

/// Reads a factory string left to right; every failure names the argument "factory" and the whole string.
class Parser {
 public:
  Parser(std::string_view function, std::string_view factory)
      : function_(function), factory_(factory), rest_(factory) {}

  bool take(std::string_view word) {
    if (!rest_.starts_with(word)) return false;
    rest_.remove_prefix(word.size());
    return true;
  }

  bool done() const { return rest_.empty(); }

  /// The decimal number at the cursor; `what` ("IVF's nlist", ...) names it in the message when there is none.
  Number number(std::string_view what) {
    std::size_t length = 0;
    while (length < rest_.size() && std::isdigit(static_cast<unsigned char>(rest_[length])) != 0) ++length;
    if (length == 0) fail_grammar(std::string("a number for ") + std::string(what));
    Number n{rest_.substr(0, length), 0};
    constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
    for (const char c : n.digits) {
      const int digit = c - '0';
      n.value = n.value > (kMax - digit) / 10 ? kMax : n.value * 10 + digit;
    }
    rest_.remove_prefix(length);
    return n;
  }

  /// `n` must lie in [low, high] (no upper limit when high is 0); `pattern` and `name` are what the message shows,
  /// e.g. "IVF{nlist}" and "nlist".
  void check_range(const Number& n, std::string_view pattern, std::string_view name, std::int64_t low,
                   std::int64_t high = 0) const {
    if (n.value >= low && (high == 0 || n.value <= high)) return;
    const std::string expected =
        std::string(pattern) + " with " +
        (high == 0 ? std::string(name) + " >= " + std::to_string(low)
                   : std::to_string(low) + " <= " + std::string(name) + " <= " + std::to_string(high));
    throw_argument_error(function_, "factory", expected,
                         describe(factory_) + " (" + std::string(name) + " = " + std::string(n.digits) + ")");
  }

  /// Throws: the string left the grammar; `at` says what was expected where it stopped.
  [[noreturn]] void fail_grammar(std::string_view at) const {
    const std::size_t offset = factory_.size() - rest_.size();
    throw_argument_error(function_, "factory", kFaissGrammar,
                         describe(factory_) + " (expected " + std::string(at) + " at offset " +
                             std::to_string(offset) + ")");
  }

 private:
  std::string_view function_;
  std::string_view factory_;
  std::string_view rest_;
};

/// HNSW{M}'s M (the "HNSW" already taken).
std::int64_t parse_hnsw_m(Parser& p) {
  const Number m = p.number("HNSW's M");
  p.check_range(m, "HNSW{M}", "M", kFaissMinHnswM, kFaissMaxHnswM);
  return m.value;
}

/// One of the allowed SQ variants at the cursor, or "" when the cursor holds none (FAISS 1.7.3's factory knows
/// no others; none is a prefix of another, so the order does not matter).
std::string parse_sq(Parser& p) {
  for (const std::string_view sq : kScalarQuantizers) {
    if (p.take(sq)) return std::string(sq);
  }
  return "";
}

/// The code after the family's comma: Flat, an SQ variant, or PQ{m} (with an x{nbits} suffix when allowed).
FaissCode parse_code(Parser& p, bool nbits_allowed) {
  FaissCode code;
  if (p.take("Flat")) return code;
  if (std::string sq = parse_sq(p); !sq.empty()) {
    code.kind = FaissCode::Kind::sq;
    code.sq = std::move(sq);
    return code;
  }
  if (!p.take("PQ")) p.fail_grammar(nbits_allowed ? "Flat, SQ{4|6|8|fp16} or PQ{m}[x{nbits}]"
                                                  : "Flat, SQ{4|6|8|fp16} or PQ{m}");
  code.kind = FaissCode::Kind::pq;
  const Number m = p.number("PQ's m");
  // The upper limit depends on the dim (check_faiss_factory_for); here only the crash of m = 0 is excluded.
  p.check_range(m, "PQ{m}", "m", 1);
  code.pq_m = m.value;
  if (nbits_allowed && p.take("x")) {
    const Number nbits = p.number("PQ's nbits");
    p.check_range(nbits, "PQ{m}x{nbits}", "nbits", kFaissMinPqBits, kFaissMaxPqBits);
    code.pq_nbits = nbits.value;
  }
  return code;
}

}  // namespace

std::string FaissFactory::text() const {
  if (family == Family::flat) return "Flat";
  std::string out = family == Family::hnsw ? "HNSW" : "IVF";
  out += std::to_string(family == Family::hnsw ? hnsw_m : nlist);
  if (family == Family::ivf && hnsw_m > 0) out.append("_HNSW").append(std::to_string(hnsw_m));
  out += ',';
  switch (code.kind) {
    case FaissCode::Kind::flat:
      out += "Flat";
      break;
    case FaissCode::Kind::sq:
      out += code.sq;
      break;
    case FaissCode::Kind::pq:
      out.append("PQ").append(std::to_string(code.pq_m));
      // HNSW's PQ has no suffix in FAISS's grammar (always 8 bits); IVF's is written only when it differs.
      if (code.pq_nbits != 8) out.append("x").append(std::to_string(code.pq_nbits));
      break;
  }
  return out;
}

FaissFactory parse_faiss_factory(std::string_view function, std::string_view factory) {
  Parser p(function, factory);
  FaissFactory parsed;
  if (p.take("Flat")) {
    parsed.family = FaissFactory::Family::flat;
  } else if (p.take("HNSW")) {
    parsed.family = FaissFactory::Family::hnsw;
    parsed.hnsw_m = parse_hnsw_m(p);
    if (p.take(",")) {
      parsed.code = parse_code(p, /*nbits_allowed=*/false);
    } else if (!p.done()) {
      p.fail_grammar("\",\" or the end of the string");  // FAISS's "_" separator included
    }
  } else if (p.take("IVF")) {
    parsed.family = FaissFactory::Family::ivf;
    const Number nlist = p.number("IVF's nlist");
    p.check_range(nlist, "IVF{nlist}", "nlist", kFaissMinNlist, kFaissMaxNlist);
    parsed.nlist = nlist.value;
    if (p.take("_HNSW")) parsed.hnsw_m = parse_hnsw_m(p);
    if (!p.take(",")) p.fail_grammar(parsed.hnsw_m > 0 ? "\",\"" : "\"_HNSW{M}\" or \",\"");
    parsed.code = parse_code(p, /*nbits_allowed=*/true);
  } else {
    p.fail_grammar("Flat, HNSW{M} or IVF{nlist}");
  }
  if (!p.done()) p.fail_grammar("the end of the string");
  return parsed;
}

std::int64_t faiss_index_dim(const FaissFactory& parsed, std::int64_t dim, bool mips) {
  if (!mips) return dim;
  const std::int64_t m = parsed.code.kind == FaissCode::Kind::pq ? parsed.code.pq_m : 1;
  return (dim + 1 + m - 1) / m * m;
}

void check_faiss_factory_for(std::string_view function, std::string_view factory, const FaissFactory& parsed,
                             std::int64_t dim, bool mips) {
  if (parsed.code.kind != FaissCode::Kind::pq) return;
  if (parsed.family == FaissFactory::Family::hnsw && !mips) {
    throw_argument_error(function, "factory",
                         "HNSW{M},PQ{m} only with options.mips_to_l2 (FAISS 1.7.3 builds HNSW over PQ codes for L2 "
                         "distances only, which rank inner products only after the MIPS transform)",
                         describe(factory) + " without options.mips_to_l2");
  }
  const std::int64_t m = parsed.code.pq_m;
  if (mips) {
    // Padding dim + 1 up to a multiple of m adds fewer than m zero coordinates; beyond dim + 1 sub-quantizers
    // would encode nothing but padding.
    if (m > dim + 1) {
      throw_argument_error(function, "factory",
                           "PQ{m} with m <= " + std::to_string(dim + 1) + " (the dim + 1 of the MIPS transform)",
                           describe(factory) + " (m = " + std::to_string(m) + ")");
    }
  } else if (dim % m != 0) {
    throw_argument_error(function, "factory", "PQ{m} with m dividing the dim " + std::to_string(dim),
                         describe(factory) + " (m = " + std::to_string(m) + ")");
  }
}

std::int64_t faiss_min_training_vectors(const FaissFactory& parsed) {
  std::int64_t needed = parsed.family == FaissFactory::Family::ivf ? parsed.nlist : 0;
  if (parsed.code.kind == FaissCode::Kind::pq) needed = std::max(needed, std::int64_t{1} << parsed.code.pq_nbits);
  return needed;
}

}  // namespace keysel::detail
