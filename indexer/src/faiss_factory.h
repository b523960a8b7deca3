// The FAISS factory strings keysel accepts, parsed and bounded before FAISS sees them (private to the indexer).
//
// FAISS 1.7.3's index_factory trusts every number it reads: IVF0 aborts, PQ0 divides by zero, PQ4x0 reads out of
// bounds, HNSW0 crashes, HNSW1 and HNSW2000000000 allocate without bound, IVF1000000000 allocates its empty lists
// up front. So keysel accepts a small grammar (the families it can drive per call, docs/candidate-search.md),
// checks every number against the limits below, and hands FAISS the string rebuilt from the checked values.
//
//   factory := "Flat"
//            | "HNSW" M [ "," hnsw_code ]
//            | "IVF" nlist [ "_HNSW" M ] "," ivf_code
//   hnsw_code := "Flat" | sq | "PQ" m                 (PQ: only with the MIPS transform, see check_faiss_factory_for)
//   ivf_code  := "Flat" | sq | "PQ" m [ "x" nbits ]
//   sq        := "SQ4" | "SQ6" | "SQ8" | "SQfp16"
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace keysel::detail {

/// IVF lists: at least one, at most 2^20. FAISS allocates every (empty) list when the index is built, 48 bytes
/// each, before any key is seen; 2^20 lists (48 MiB) is already far beyond the sqrt(N)..4 sqrt(N) of any key
/// cache (a million keys wants about 4096). Training also needs at least nlist keys (checked at train time).
inline constexpr std::int64_t kFaissMinNlist = 1;
inline constexpr std::int64_t kFaissMaxNlist = std::int64_t{1} << 20;

/// HNSW links per node (also IVF's HNSW coarse quantizer). FAISS draws a node's level with probability decaying
/// as M^-level: M = 1 makes that 1/log(1) = infinite and every node gets tens of levels (gigabytes for a few
/// hundred keys), M = 0 crashes. Each key holds 2M links (4 bytes) on the bottom layer and M per upper layer, so
/// M = 256 is already 2 KiB of links per key, four times the fp32 vector of a 128-wide head, for recall that
/// stops improving long before (FAISS suggests 4 to 64).
inline constexpr std::int64_t kFaissMinHnswM = 2;
inline constexpr std::int64_t kFaissMaxHnswM = 256;

/// PQ bits per sub-quantizer code (the x{nbits} suffix, 8 when absent). 0 makes a one-centroid codebook that
/// FAISS's search reads past; FAISS 1.7.3's IndexIVFPQ refuses more than 8 (and leaks its coarse quantizer when
/// it does).
inline constexpr std::int64_t kFaissMinPqBits = 1;
inline constexpr std::int64_t kFaissMaxPqBits = 8;

/// The accepted grammar, as error messages print it.
inline constexpr std::string_view kFaissGrammar =
    "a FAISS factory string of keysel's grammar: Flat | HNSW{M}[,Flat|,SQ{4|6|8|fp16}|,PQ{m}] | "
    "IVF{nlist}[_HNSW{M}],{Flat|SQ{4|6|8|fp16}|PQ{m}[x{nbits}]} with 1 <= nlist <= 1048576, 2 <= M <= 256, "
    "m >= 1 and 1 <= nbits <= 8";

/// How the vectors are stored: in full, as scalar codes, or as product-quantisation codes.
struct FaissCode {
  enum class Kind { flat, sq, pq };
  Kind kind = Kind::flat;
  std::string sq;              // "SQ4", "SQ6", "SQ8" or "SQfp16" (kind sq)
  std::int64_t pq_m = 0;       // PQ sub-quantizers (kind pq)
  std::int64_t pq_nbits = 8;   // bits per sub-quantizer code (kind pq)
};

/// One parsed factory string; every number is within the limits above.
struct FaissFactory {
  enum class Family { flat, ivf, hnsw };
  Family family = Family::flat;
  std::int64_t nlist = 0;   // IVF lists (ivf)
  std::int64_t hnsw_m = 0;  // links per node of the HNSW graph (hnsw) or of IVF's coarse quantizer (ivf; 0 = flat)
  FaissCode code;

  /// The string for faiss::index_factory, rebuilt from the checked fields.
  std::string text() const;
};

/// Parses `factory` (the argument named "factory" of `function`); throws keysel::Error naming the argument, the
/// rule broken and the string when it is outside the grammar or a number is out of range.
FaissFactory parse_faiss_factory(std::string_view function, std::string_view factory);

/// The dim of the vectors FAISS stores: dim, or with the MIPS transform dim + 1, rounded up to a multiple of PQ's
/// m with zero coordinates (which change no L2 distance) so that the sub-quantizers split it evenly.
std::int64_t faiss_index_dim(const FaissFactory& parsed, std::int64_t dim, bool mips);

/// The checks that need the dim and the transform: PQ's m must divide the dim (or, with the MIPS transform, be at
/// most dim + 1, which is then padded), and FAISS builds HNSW over PQ codes for L2 distances only, so that code
/// needs the MIPS transform.
void check_faiss_factory_for(std::string_view function, std::string_view factory, const FaissFactory& parsed,
                             std::int64_t dim, bool mips);

/// The fewest training vectors FAISS can train `parsed` on: nlist for IVF's k-means, 2^nbits for PQ's codebooks
/// (one vector per centroid), 0 when nothing is learned from points.
std::int64_t faiss_min_training_vectors(const FaissFactory& parsed);

}  // namespace keysel::detail
