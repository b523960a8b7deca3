// Exact maximum-inner-product top-k (the flat-index search FAISS calls IndexFlatIP::search), fused: the
// [nq, N] score matrix never exists.
//
// AVX-512 level (the fused scan):
//   1. queries go in vector lanes, 64 per chunk (4 registers of 16), transposed once: qt [dim][64];
//   2. a threshold per query from a sample of 2048 keys spread over the key range (scored with the fp32 kernel):
//      the r-th best sampled score, r = e + 3 sqrt(e) + 8 for e = k * 2048 / N expected top-k keys in the sample
//      (rank_thresholds_avx512: a binary search on the scores' order keys, 16 queries at once), so that about 1.8x
//      k keys pass it;
//   3. one pass over the keys, read in place (no packing) and split across threads: a register tile of 64
//      queries x 6 keys (24 accumulators), compared with the thresholds in registers; only keys at or above them
//      leave the registers, appended to the query's list as 64-bit candidate words (score key << 32 | ~position;
//      a full list keeps its best k and raises the threshold). Two scans, chosen by choose_kernel:
//        avx512_fma             fp32 FMA (scan_keys_avx512);
//        avx512_bf16_prefilter  bf16 dot products (scan_keys_bf16, where `vdpbf16ps` outruns FMA): a key is kept
//                               unless its bf16 score is below the threshold by more than a proven error bound,
//                               and the kept keys are rescored exactly every 512 keys, while in cache
//                               (exact_scores_avx512), before they enter the list;
//   4. per query: the lists of all threads, the k best words (a bucket sort over their range), sorted (descending
//      word = higher score first, then lower index). A query whose k-th best does not reach its threshold (the
//      sample misjudged it: rare, never wrong) is redone with no threshold.
// Every score is one fp32 FMA chain over d = 0 .. dim-1, bit for bit the same in both scans and in the AVX2 block
// kernel.
//
// AVX2 and scalar levels: keys are scored a block at a time for a chunk of queries by a register-blocked kernel
// (keys packed into panels), and every block is pushed into one StreamingTopK per query.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <vector>

#include "fast_topk_kernels.h"
#include "keysel/core/cpu_features.h"
#include "keysel/indexer/fast_topk.h"
#include "keysel/indexer/simd.h"

namespace keysel {
namespace {

constexpr std::int64_t kMaxIndex = std::numeric_limits<std::int32_t>::max();
constexpr float kInf = std::numeric_limits<float>::infinity();
/// The bf16 prefilter's speed per `vdpbf16ps` MAC relative to the fp32 scan's per FMA MAC (its rescoring and
/// conversions cost the rest); measured on Zen 4: see docs/performance.md.
constexpr double kBf16PrefilterEfficiency = 0.55;

std::int64_t round_up(std::int64_t value, std::int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

/// Writes one query's result from its best words sorted in descending order (n of them, n <= k).
void write_row(const std::uint64_t* words, std::int64_t n, std::int64_t k, float* scores, std::int64_t* ids) {
  for (std::int64_t i = 0; i < k; ++i) {
    const bool have = i < n;
    if (ids != nullptr) ids[i] = have ? topk_kernels::candidate_position(words[i]) : -1;
    if (scores != nullptr) scores[i] = have ? topk_kernels::candidate_score(words[i]) : -kInf;
  }
}

/// The best min(n, k) of the words in `sources` (n in all), sorted in descending order, into out. A bucket sort on
/// the score keys over their actual range: one pass for the range, one for the bucket counts, one scatter of the
/// words in the buckets that hold the best k, then a sort of each (small) bucket.
struct WordSpan {
  const std::uint64_t* words;
  std::int64_t count;
};
std::int64_t best_sorted(std::span<const WordSpan> sources, std::int64_t k, std::vector<std::uint64_t>& out,
                         std::vector<std::uint32_t>& bucket_count) {
  std::int64_t n = 0;
  std::uint32_t low = 0xFFFFFFFFu, high = 0;
  for (const WordSpan& s : sources) {
    n += s.count;
    for (std::int64_t i = 0; i < s.count; ++i) {
      const auto key = static_cast<std::uint32_t>(s.words[i] >> 32);
      low = std::min(low, key);
      high = std::max(high, key);
    }
  }
  const std::int64_t kept = std::min(n, k);
  if (out.size() < static_cast<std::size_t>(n)) out.resize(static_cast<std::size_t>(n));
  if (n <= 256 || low == high) {
    std::int64_t w = 0;
    for (const WordSpan& s : sources) w = std::copy(s.words, s.words + s.count, out.begin() + w) - out.begin();
    std::partial_sort(out.begin(), out.begin() + kept, out.begin() + n, std::greater<std::uint64_t>());
    return kept;
  }
  // bucket = (key - low) * kBuckets / range, by a multiplication: monotonic in the key and below kBuckets.
  constexpr int kBuckets = 4096;
  const std::uint64_t scale = (static_cast<std::uint64_t>(kBuckets) << 32) / (static_cast<std::uint64_t>(high - low) + 1);
  const auto bucket_of = [&](std::uint64_t word) {
    return static_cast<int>((static_cast<std::uint64_t>(static_cast<std::uint32_t>(word >> 32) - low) * scale) >> 32);
  };
  bucket_count.assign(kBuckets, 0);
  for (const WordSpan& s : sources) {
    for (std::int64_t i = 0; i < s.count; ++i) ++bucket_count[static_cast<std::size_t>(bucket_of(s.words[i]))];
  }
  // The buckets from the top down to the one holding the k-th word get their places, best first; every lower
  // bucket writes to the one spare slot past them (no branch on the bucket in the scatter).
  int cut = kBuckets - 1;
  std::int64_t above = 0;
  while (above + bucket_count[static_cast<std::size_t>(cut)] < kept) above += bucket_count[static_cast<std::size_t>(cut--)];
  const std::int64_t top = above + bucket_count[static_cast<std::size_t>(cut)];
  if (out.size() < static_cast<std::size_t>(top + 1)) out.resize(static_cast<std::size_t>(top + 1));
  std::int64_t offset = 0;
  for (int b = kBuckets - 1; b >= 0; --b) {
    const std::uint32_t c = bucket_count[static_cast<std::size_t>(b)];
    bucket_count[static_cast<std::size_t>(b)] = static_cast<std::uint32_t>(b >= cut ? offset : top);
    offset += b >= cut ? c : 0;
  }
  for (const WordSpan& s : sources) {
    for (std::int64_t i = 0; i < s.count; ++i) {
      const int b = bucket_of(s.words[i]);
      const std::uint32_t at = bucket_count[static_cast<std::size_t>(b)];
      out[at] = s.words[i];
      bucket_count[static_cast<std::size_t>(b)] = at + (b >= cut ? 1u : 0u);
    }
  }
  // Buckets are in order; one insertion sort puts the words inside each in order (few moves: buckets are small).
  std::uint64_t* w = out.data();
  for (std::int64_t i = 1; i < top; ++i) {
    const std::uint64_t word = w[i];
    std::int64_t j = i;
    for (; j > 0 && w[j - 1] < word; --j) w[j] = w[j - 1];
    w[j] = word;
  }
  return kept;
}

// ---- the fused AVX-512 scan ---------------------------------------------------------------------------------

constexpr std::int64_t kChunkQueries = 16 * topk_kernels::kScanMaxVectors;  // 64
constexpr std::int64_t kSample = 2048;
constexpr std::int64_t kMinKeysPerPart = 8192;
constexpr std::int64_t kRescoreBlock = 512;  // keys the bf16 prefilter scans before rescoring them (256 KiB at D = 128)
constexpr double kNormLow = 0x1p-40, kNormHigh = 0x1p40;

/// What the candidate lists' compaction needs.
struct ListsOwner {
  std::int64_t k = 0;
};

void compact_list(topk_kernels::CandidateLists& lists, std::int64_t query) {
  const std::int64_t k = static_cast<const ListsOwner*>(lists.owner)->k;
  std::uint64_t* words = lists.words + query * lists.capacity;
  std::int64_t& count = lists.count[query];
  std::nth_element(words, words + (k - 1), words + count, std::greater<std::uint64_t>());
  lists.threshold[query] = topk_kernels::candidate_score(words[k - 1]);
  count = k;
}

/// Buffers kept between calls by the calling thread (fresh pages cost page faults on every call).
struct FusedBuffers {
  std::vector<float> qt;                 // [chunks][dim][64]
  std::vector<std::uint32_t> qt16;       // [chunks][ceil(dim / 2)][64] (bf16 prefilter)
  std::vector<float> bound;              // [chunks * 64] (bf16 prefilter)
  std::vector<float> sample_keys;        // [kSample][dim]
  std::vector<float> sample_scores;      // [chunks][kSample][64]
  std::vector<float> start_threshold;    // [chunks * 64]
  std::vector<std::uint64_t> words;      // [chunks][parts][64][capacity]
  std::vector<std::int64_t> counts;      // [chunks][parts][64]
  std::vector<float> thresholds;         // [chunks][parts][64]
  template <typename T>
  static T* sized(std::vector<T>& v, std::int64_t n) {
    if (v.size() < static_cast<std::size_t>(n)) v.resize(static_cast<std::size_t>(n));
    return v.data();
  }
};

/// c with |exact - a| <= c ||q|| ||k|| for the bf16 prefilter: bf16 rounding of both operands (2u + u^2, u = 2^-8),
/// the two fp32 accumulations (at most dim roundings each; 4 gamma covers them with directed rounding too), then
/// margins for the fp32 norms and the rounding of threshold - c ||q|| ||k||. Denormal flushing and overflow are
/// negligible for norms in [2^-40, 2^40] (other keys are always kept; other queries take the fp32 scan).
double bf16_error_factor(std::int64_t dim) {
  const double u = 0x1p-8, unit = 0x1p-24 * static_cast<double>(dim);
  const double gamma = unit / (1.0 - unit);
  return (2.0 * u + u * u + 4.0 * gamma) * (1.0 + 0x1p-8) * (1.0 + 2.0 * gamma + 0x1p-20) + 0x1p-22;
}

/// Fused top-k for queries [nq, dim] (AVX-512): the exact fp32 scan, or with `approx` the bf16 prefilter and an
/// exact rescoring of what it keeps. Queries that must be redone without a sampled threshold (their lists held
/// fewer than k words that reach it) are appended to `redo` (only with `sample`).
void fused_topk(const float* queries, std::int64_t nq, const float* keys, std::int64_t n_keys, std::int64_t dim,
                std::int64_t k, float* scores, std::int64_t* ids, bool sample, bool approx,
                std::vector<std::int64_t>& redo) {
  thread_local FusedBuffers buffers;
  const std::int64_t chunks = (nq + kChunkQueries - 1) / kChunkQueries;
  const std::int64_t threads = omp_get_max_threads();
  // Few query chunks: the keys are split too, one part per thread.
  const std::int64_t parts = std::clamp<std::int64_t>(threads / chunks, 1, std::max<std::int64_t>(n_keys / kMinKeysPerPart, 1));
  const std::int64_t tasks = chunks * parts;
  const std::int64_t pairs = (dim + 1) / 2;

  // The sample and its rank (no sample for small key counts or large k: nothing to gain).
  const double expected = static_cast<double>(k) * static_cast<double>(kSample) / static_cast<double>(std::max<std::int64_t>(n_keys, 1));
  const std::int64_t rank = static_cast<std::int64_t>(std::ceil(expected + 3.0 * std::sqrt(expected) + 8.0));
  sample = sample && n_keys >= 8 * kSample && rank < kSample / 4;
  approx = approx && sample;  // the prefilter needs a threshold: without one it keeps every key
  // Room for about twice the keys expected to pass the threshold (a full list is compacted, so any is correct).
  const std::int64_t keys_per_part = (n_keys + parts - 1) / parts;
  const std::int64_t expected_pass = sample ? 2 * rank * keys_per_part / kSample : keys_per_part;
  // The bf16 prefilter appends up to a block of keys before its lists are rescored and compacted: room for one.
  const std::int64_t capacity = std::max({k + 1024, std::min(2 * k, k + expected_pass), std::min(expected_pass, k + 4096)}) +
                                (approx ? kRescoreBlock : 0);

  float* qt = FusedBuffers::sized(buffers.qt, chunks * dim * kChunkQueries);
  std::uint32_t* qt16 = approx ? FusedBuffers::sized(buffers.qt16, chunks * pairs * kChunkQueries) : nullptr;
  float* bound = approx ? FusedBuffers::sized(buffers.bound, chunks * kChunkQueries) : nullptr;
  float* sample_keys = sample ? FusedBuffers::sized(buffers.sample_keys, kSample * dim) : nullptr;
  float* sample_scores = sample ? FusedBuffers::sized(buffers.sample_scores, chunks * kSample * kChunkQueries) : nullptr;
  float* start_threshold = FusedBuffers::sized(buffers.start_threshold, chunks * kChunkQueries);
  std::uint64_t* words = FusedBuffers::sized(buffers.words, tasks * kChunkQueries * capacity);
  std::int64_t* counts = FusedBuffers::sized(buffers.counts, tasks * kChunkQueries);
  float* thresholds = FusedBuffers::sized(buffers.thresholds, tasks * kChunkQueries);
  const double error_factor = bf16_error_factor(dim);

  const auto vectors_of = [&](std::int64_t chunk) {
    return (std::min(kChunkQueries, nq - chunk * kChunkQueries) + 15) / 16;
  };
  std::vector<std::int64_t> short_queries;

#pragma omp parallel if (tasks > 1 || sample)
  {
    // Transposed queries, zero past the last query; the sample keys (strided: key (2i + 1) N / 2S).
#pragma omp for schedule(static)
    for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
      const std::int64_t q0 = chunk * kChunkQueries, width = 16 * vectors_of(chunk);
      const std::int64_t count = std::min(kChunkQueries, nq - q0);
      float* t = qt + chunk * dim * kChunkQueries;
      for (std::int64_t d = 0; d < dim; ++d) {
        for (std::int64_t i = 0; i < width; ++i) t[d * width + i] = i < count ? queries[(q0 + i) * dim + d] : 0.0f;
      }
      if (approx) {
        topk_kernels::pack_queries_bf16(queries + q0 * dim, count, dim, vectors_of(chunk),
                                        qt16 + chunk * pairs * kChunkQueries);
        for (std::int64_t i = 0; i < kChunkQueries; ++i) {
          double norm = 0;
          for (std::int64_t d = 0; i < count && d < dim; ++d) {
            const double x = queries[(q0 + i) * dim + d];
            norm += x * x;
          }
          // Rounded up, so that the bound stays a bound.
          bound[q0 + i] = std::nextafter(static_cast<float>(error_factor * std::sqrt(norm)), kInf);
        }
      }
    }
    if (sample) {
#pragma omp for schedule(static)
      for (std::int64_t i = 0; i < kSample; ++i) {
        const std::int64_t key = (2 * i + 1) * n_keys / (2 * kSample);
        if (i + 8 < kSample) {  // the rows are far apart: fetch ahead
          const float* ahead = keys + ((2 * (i + 8) + 1) * n_keys / (2 * kSample)) * dim;
          for (std::int64_t d = 0; d < dim; d += 16) __builtin_prefetch(ahead + d);
        }
        std::copy(keys + key * dim, keys + (key + 1) * dim, sample_keys + i * dim);
      }
      // Sample scores (exact fp32), split over threads by sample keys, then the r-th best per query.
      constexpr std::int64_t kSlice = 256;
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
        for (std::int64_t s = 0; s < kSample; s += kSlice) {
          const std::int64_t width = 16 * vectors_of(chunk);
          topk_kernels::score_keys_avx512(qt + chunk * dim * kChunkQueries, vectors_of(chunk), sample_keys + s * dim,
                                          kSlice, dim, sample_scores + (chunk * kSample + s) * width);
        }
      }
      // Per 16 queries: the rank-th best of their sample scores.
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t group = 0; group < (nq + 15) / 16; ++group) {
        const std::int64_t q0 = group * 16, chunk = q0 / kChunkQueries, lane0 = q0 % kChunkQueries;
        const std::int64_t width = 16 * vectors_of(chunk);
        float threshold[16];
        thread_local std::vector<std::uint32_t> order_keys;
        order_keys.resize(static_cast<std::size_t>(16 * kSample));
        topk_kernels::rank_thresholds_avx512(sample_scores + chunk * kSample * width + lane0, kSample, width, rank,
                                             order_keys.data(), threshold);
        std::copy(threshold, threshold + std::min<std::int64_t>(16, nq - q0), start_threshold + q0);
      }
    } else {
#pragma omp for schedule(static)
      for (std::int64_t q = 0; q < nq; ++q) start_threshold[q] = -kInf;
    }

    // The scan: one task per (chunk, part of the keys).
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t chunk = task / parts, part = task % parts;
      const std::int64_t q0 = chunk * kChunkQueries;
      ListsOwner owner{k};
      std::int64_t* count = counts + task * kChunkQueries;
      float* threshold = thresholds + task * kChunkQueries;
      for (std::int64_t i = 0; i < kChunkQueries; ++i) {
        count[i] = 0;
        threshold[i] = q0 + i < nq ? start_threshold[q0 + i] : kInf;
      }
      const std::int64_t begin = n_keys * part / parts, end = n_keys * (part + 1) / parts;
      topk_kernels::CandidateLists lists;
      lists.words = words + task * kChunkQueries * capacity;
      lists.count = count;
      lists.threshold = threshold;
      lists.capacity = capacity;
      lists.compact = compact_list;
      lists.owner = &owner;
      if (!approx) {
        topk_kernels::scan_keys_avx512(qt + chunk * dim * kChunkQueries, vectors_of(chunk), keys + begin * dim,
                                       end - begin, dim, static_cast<std::uint32_t>(begin), lists);
        continue;
      }
      // The bf16 prefilter, a block at a time; the keys it keeps are rescored exactly, 16 at a time, while they are
      // still in cache (a query's last few wait for the next block; a NaN score drops the key); a list without room
      // for another block then keeps its k best.
      thread_local std::vector<std::uint32_t> kept;
      thread_local std::vector<std::int64_t> kept_count;
      thread_local std::vector<float> exact;
      constexpr std::int64_t kKeptRoom = kRescoreBlock + 16;
      kept.resize(static_cast<std::size_t>(kChunkQueries * kKeptRoom));
      kept_count.assign(static_cast<std::size_t>(kChunkQueries), 0);
      exact.resize(static_cast<std::size_t>(kKeptRoom));
      thread_local std::vector<topk_kernels::RescoreGroup> groups;
      topk_kernels::ApproxLists approx_lists;
      approx_lists.positions = kept.data();
      approx_lists.count = kept_count.data();
      approx_lists.threshold = threshold;
      approx_lists.bound = bound + q0;
      approx_lists.capacity = kKeptRoom;
      const std::int64_t live = std::min(kChunkQueries, nq - q0);
      for (std::int64_t b0 = begin; b0 < end; b0 += kRescoreBlock) {
        const std::int64_t b1 = std::min(b0 + kRescoreBlock, end);
        topk_kernels::scan_keys_bf16(qt16 + chunk * pairs * kChunkQueries, vectors_of(chunk), keys + b0 * dim, b1 - b0,
                                     dim, static_cast<std::uint32_t>(b0), approx_lists);
        const bool last = b1 == end;
        for (std::int64_t i = 0; i < live; ++i) {
          std::int64_t& waiting = kept_count[static_cast<std::size_t>(i)];
          const std::int64_t now = last ? waiting : waiting / 16 * 16;  // whole groups of 16; the rest waits
          if (now == 0) continue;
          std::uint32_t* position = kept.data() + i * kKeptRoom;
          const float* score = exact.data();
          groups.clear();
          for (std::int64_t f = 0; f < now; f += 16) {
            groups.push_back({queries + (q0 + i) * dim, position + f, std::min<std::int64_t>(16, now - f), exact.data() + f});
          }
          topk_kernels::exact_scores_avx512(groups.data(), static_cast<std::int64_t>(groups.size()), keys, dim);
          std::uint64_t* list = lists.words + i * capacity;
          std::int64_t w = count[i];
          for (std::int64_t f = 0; f < now; ++f) {
            const float v = score[f];
            list[w] = topk_kernels::make_candidate(v, position[f]);
            w += v == v;  // a NaN score drops the key
          }
          count[i] = w;
          std::copy(position + now, position + waiting, position);
          waiting -= now;
          if (count[i] + kRescoreBlock > capacity) compact_list(lists, i);
        }
      }
    }

    // Per query: the parts' lists, the k best, sorted.
    std::vector<std::uint64_t> best;
    std::vector<std::uint32_t> bucket_count;
    std::vector<WordSpan> sources(static_cast<std::size_t>(parts));
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t q = 0; q < nq; ++q) {
      const std::int64_t chunk = q / kChunkQueries, lane = q % kChunkQueries;
      for (std::int64_t part = 0; part < parts; ++part) {
        const std::int64_t list = (chunk * parts + part) * kChunkQueries + lane;
        sources[static_cast<std::size_t>(part)] = {words + list * capacity, counts[list]};
      }
      const std::int64_t kept = best_sorted(sources, k, best, bucket_count);
      // Every key left out scored below the sampled threshold (the fp32 scan: exactly; the bf16 prefilter: by
      // more than its error bound): the k best are exact when the k-th reaches the threshold.
      const bool ok = start_threshold[q] == -kInf ||
                      (kept == k && topk_kernels::candidate_score(best[static_cast<std::size_t>(k - 1)]) >= start_threshold[q]);
      if (!ok) {
#pragma omp critical(keysel_inner_product_redo)
        short_queries.push_back(q);
        continue;
      }
      write_row(best.data(), kept, k, scores != nullptr ? scores + q * k : nullptr, ids != nullptr ? ids + q * k : nullptr);
    }
  }
  redo.insert(redo.end(), short_queries.begin(), short_queries.end());
}

/// True when every query's norm is 0 or in [2^-40, 2^40] (the range the bf16 error bound covers).
bool norms_in_range(const float* queries, std::int64_t nq, std::int64_t dim) {
  for (std::int64_t q = 0; q < nq; ++q) {
    double norm = 0;
    for (std::int64_t d = 0; d < dim; ++d) norm += static_cast<double>(queries[q * dim + d]) * queries[q * dim + d];
    norm = std::sqrt(norm);
    if (norm != 0.0 && !(norm >= kNormLow && norm <= kNormHigh)) return false;
  }
  return true;
}

/// The AVX-512 implementations of the fused scan: the exact fp32 one, and the bf16 prefilter with exact rescoring
/// (picked where `vdpbf16ps` outruns fp32 FMA by enough to pay for the rescoring: AMD Zen 4, not Intel Xeon).
constexpr KernelOption kFusedOptions[] = {
    {"avx512_fma", SimdLevel::avx512, MacOp::fma_zmm},
    {"avx512_bf16_prefilter", SimdLevel::avx512, MacOp::dpbf16_zmm, 0, kBf16PrefilterEfficiency},
};

/// The AVX-512 path: the fused scan, then the rare queries the sampled threshold failed, redone without it.
void inner_product_topk_avx512(const float* queries, std::int64_t nq, const float* keys, std::int64_t n_keys,
                               std::int64_t dim, std::int64_t k, float* scores, std::int64_t* ids) {
  const bool approx = choose_kernel(kFusedOptions) == 1 && norms_in_range(queries, nq, dim);
  std::vector<std::int64_t> redo;
  fused_topk(queries, nq, keys, n_keys, dim, k, scores, ids, true, approx, redo);
  if (redo.empty()) return;
  std::sort(redo.begin(), redo.end());
  const std::int64_t m = static_cast<std::int64_t>(redo.size());
  std::vector<float> q(static_cast<std::size_t>(m * dim)), s(scores != nullptr ? static_cast<std::size_t>(m * k) : 0);
  std::vector<std::int64_t> i(ids != nullptr ? static_cast<std::size_t>(m * k) : 0), none;
  for (std::int64_t r = 0; r < m; ++r) std::copy(queries + redo[r] * dim, queries + (redo[r] + 1) * dim, q.begin() + r * dim);
  fused_topk(q.data(), m, keys, n_keys, dim, k, scores != nullptr ? s.data() : nullptr, ids != nullptr ? i.data() : nullptr,
             false, false, none);
  for (std::int64_t r = 0; r < m; ++r) {
    if (scores != nullptr) std::copy(s.begin() + r * k, s.begin() + (r + 1) * k, scores + redo[r] * k);
    if (ids != nullptr) std::copy(i.begin() + r * k, i.begin() + (r + 1) * k, ids + redo[r] * k);
  }
}

// ---- AVX2 and scalar: block scores and StreamingTopK ----------------------------------------------------------

constexpr std::int64_t kQueryChunk = 64;  // queries scored together (their rows stay in L1/L2)
constexpr std::int64_t kKeyBlock = 1008;  // keys per block (21 key tiles): kQueryChunk x kKeyBlock scores ~ 256 KiB

/// One thread's buffers: a padded chunk of queries, the scores of one key block for it, a packed key panel and
/// (when keys are not split across threads) the accumulators of the chunk's queries.
struct Workspace {
  std::vector<float> query_tile;
  std::vector<float> block;
  std::vector<float> panel;
  std::vector<StreamingTopK> local;

  void prepare(std::int64_t dim, std::int64_t accumulators, std::int64_t k) {
    const std::int64_t rows = round_up(kQueryChunk, topk_kernels::kQueryTile);
    if (query_tile.size() < static_cast<std::size_t>(rows * dim)) query_tile.resize(static_cast<std::size_t>(rows * dim));
    if (block.size() < static_cast<std::size_t>(rows * kKeyBlock)) block.resize(static_cast<std::size_t>(rows * kKeyBlock));
    if (panel.size() < static_cast<std::size_t>(topk_kernels::kKeyTile * dim)) {
      panel.resize(static_cast<std::size_t>(topk_kernels::kKeyTile * dim));
    }
    if (local.size() < static_cast<std::size_t>(accumulators)) local.resize(static_cast<std::size_t>(accumulators));
    for (std::int64_t i = 0; i < accumulators; ++i) local[static_cast<std::size_t>(i)].reset(k);
  }
};

void inner_product_topk_blocks(SimdLevel level, const float* queries, std::int64_t nq, const float* keys,
                               std::int64_t n_keys, std::int64_t dim, std::int64_t k, float* scores, std::int64_t* ids) {
  const topk_kernels::BlockScoresFn block_scores = topk_kernels::block_scores_for(level);
  const std::int64_t chunks = (nq + kQueryChunk - 1) / kQueryChunk;
  const std::int64_t blocks = std::max<std::int64_t>((n_keys + kKeyBlock - 1) / kKeyBlock, 1);
  // Few query chunks: split the keys too, one accumulator per (part, query), merged at the end.
  const std::int64_t threads = omp_get_max_threads();
  const std::int64_t parts = std::clamp<std::int64_t>(threads / chunks, 1, blocks);
  const std::int64_t tasks = chunks * parts;
  // Buffers are kept per thread between calls (OpenMP reuses its threads): fresh pages for the accumulators
  // would cost more page faults than a whole selection pass.
  thread_local std::vector<StreamingTopK> partial;
  if (parts > 1) {
    if (partial.size() < static_cast<std::size_t>(parts * nq)) partial.resize(static_cast<std::size_t>(parts * nq));
    for (std::int64_t i = 0; i < parts * nq; ++i) partial[static_cast<std::size_t>(i)].reset(k);
  }
  StreamingTopK* const partial_data = partial.data();

#pragma omp parallel if (tasks > 1)
  {
    thread_local Workspace work;
    work.prepare(dim, parts > 1 ? 0 : kQueryChunk, k);
    std::vector<float>& query_tile = work.query_tile;
    std::vector<float>& block = work.block;
    std::vector<float>& workspace = work.panel;
    std::vector<StreamingTopK>& local = work.local;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t task = 0; task < tasks; ++task) {
      const std::int64_t chunk = task / parts;
      const std::int64_t part = task % parts;
      const std::int64_t q0 = chunk * kQueryChunk;
      const std::int64_t count = std::min(kQueryChunk, nq - q0);
      const std::int64_t padded = round_up(count, topk_kernels::kQueryTile);
      std::copy(queries + q0 * dim, queries + (q0 + count) * dim, query_tile.begin());
      std::fill(query_tile.begin() + count * dim, query_tile.begin() + padded * dim, 0.0f);
      StreamingTopK* tops = parts > 1 ? partial_data + part * nq + q0 : local.data();
      const std::int64_t first_block = blocks * part / parts;
      const std::int64_t end_block = blocks * (part + 1) / parts;
      for (std::int64_t b = first_block; b < end_block; ++b) {
        const std::int64_t first_key = b * kKeyBlock;
        const std::int64_t n = std::min(kKeyBlock, n_keys - first_key);
        if (n <= 0) continue;
        block_scores(query_tile.data(), padded, keys + first_key * dim, n, dim, block.data(), kKeyBlock,
                     workspace.data());
        for (std::int64_t q = 0; q < count; ++q) tops[q].push(block.data() + q * kKeyBlock, first_key, n);
      }
      if (parts == 1) {
        for (std::int64_t q = 0; q < count; ++q) {
          const std::int64_t row = (q0 + q) * k;
          tops[q].finish_by_score(ids != nullptr ? ids + row : nullptr, scores != nullptr ? scores + row : nullptr);
        }
      }
    }
    if (parts > 1) {
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t q = 0; q < nq; ++q) {
        StreamingTopK& top = partial_data[q];
        for (std::int64_t p = 1; p < parts; ++p) top.merge(partial_data[p * nq + q]);
        top.finish_by_score(ids != nullptr ? ids + q * k : nullptr, scores != nullptr ? scores + q * k : nullptr);
      }
    }
  }
}

}  // namespace

std::string_view inner_product_kernel_name() {
  switch (simd_level()) {
    case SimdLevel::avx512: return kFusedOptions[choose_kernel(kFusedOptions)].name;
    case SimdLevel::avx2: return "avx2_fma";
    case SimdLevel::scalar: break;
  }
  return "scalar";
}

void inner_product_topk(std::int64_t nq, const float* queries, std::int64_t n_keys, const float* keys,
                        std::int64_t dim, std::int64_t k, float* scores, std::int64_t* ids) {
  KEYSEL_CHECK_ARG(nq >= 0, "nq", ">= 0", nq);
  KEYSEL_CHECK_ARG(n_keys >= 0 && n_keys < kMaxIndex, "n_keys", "0 <= n_keys < 2^31 - 1", n_keys);
  KEYSEL_CHECK_ARG(dim >= 1, "dim", ">= 1", dim);
  KEYSEL_CHECK_ARG(k >= 1 && k < kMaxIndex, "k", "1 <= k < 2^31 - 1", k);
  KEYSEL_CHECK_ARG(queries != nullptr || nq == 0, "queries", "a non-null pointer (nq > 0)", "null");
  KEYSEL_CHECK_ARG(keys != nullptr || n_keys == 0, "keys", "a non-null pointer (n_keys > 0)", "null");
  const SimdLevel level = simd_level();  // a bad KEYSEL_SIMD throws here, before any parallel region
  if (nq == 0) return;
  if (level == SimdLevel::avx512 && n_keys > 0) {
    inner_product_topk_avx512(queries, nq, keys, n_keys, dim, k, scores, ids);
  } else {
    inner_product_topk_blocks(level, queries, nq, keys, n_keys, dim, k, scores, ids);
  }
}

void inner_product_topk(const TensorView& queries, const TensorView& keys, std::int64_t k, const TensorView& scores,
                        const TensorView& ids) {
  constexpr std::string_view function = "inner_product_topk";
  expect_shape(function, queries, "queries", {kAnyExtent, kAnyExtent});
  expect_dtype(function, queries, "queries", {DType::fp32});
  expect_device(function, queries, "queries", Device::cpu());
  expect_contiguous(function, queries, "queries");
  const std::int64_t nq = queries.size(0);
  const std::int64_t dim = queries.size(1);
  expect_shape(function, keys, "keys", {kAnyExtent, dim});
  expect_dtype(function, keys, "keys", {DType::fp32});
  expect_device(function, keys, "keys", Device::cpu());
  expect_contiguous(function, keys, "keys");
  KEYSEL_CHECK_ARG(k >= 1 && k < kMaxIndex, "k", "1 <= k < 2^31 - 1", k);
  if (!scores.empty()) {
    expect_shape(function, scores, "scores", {nq, k});
    expect_dtype(function, scores, "scores", {DType::fp32});
    expect_device(function, scores, "scores", Device::cpu());
    expect_contiguous(function, scores, "scores");
    expect_writable(function, scores, "scores");
  }
  if (!ids.empty()) {
    expect_shape(function, ids, "ids", {nq, k});
    expect_dtype(function, ids, "ids", {DType::int32});
    expect_device(function, ids, "ids", Device::cpu());
    expect_contiguous(function, ids, "ids");
    expect_writable(function, ids, "ids");
  }
  std::vector<std::int64_t> wide_ids(ids.empty() ? 0 : static_cast<std::size_t>(nq * k));
  inner_product_topk(nq, queries.data<float>(), keys.size(0), keys.data<float>(), dim, k,
                     scores.empty() ? nullptr : scores.mutable_data<float>(), ids.empty() ? nullptr : wide_ids.data());
  if (!ids.empty()) {
    std::int32_t* out = ids.mutable_data<std::int32_t>();
    for (std::size_t i = 0; i < wide_ids.size(); ++i) out[i] = static_cast<std::int32_t>(wide_ids[i]);
  }
}

}  // namespace keysel
