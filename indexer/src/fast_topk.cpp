// Fast exact top-k: StreamingTopK, the row and tensor selections, the scalar kernels and the SIMD level.
#include "keysel/indexer/fast_topk.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "fast_topk_kernels.h"
#include "topk_arguments.h"
#include "keysel/indexer/topk.h"

namespace keysel {
namespace {

using topk_kernels::candidate_position;
using topk_kernels::candidate_score;

constexpr std::int64_t kMaxK = std::numeric_limits<std::int32_t>::max();
constexpr std::int64_t kChunk = 4096;  // scores filtered per step of StreamingTopK::push
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr std::int64_t kSampleRuns = 64;  // the row sample: kSampleRuns runs of consecutive scores

/// The k-th largest of n distinct candidate words (1 <= k <= n), without reordering `words`. A histogram of
/// the score keys over their actual range (2048 bins) finds the bin holding the k-th word; only that bin is
/// partially sorted. `scratch` gets resized to at least the bin's size.
std::uint64_t kth_best_word(const std::uint64_t* words, std::int64_t n, std::int64_t k, std::vector<std::uint64_t>& scratch) {
  constexpr int kBins = 2048;
  std::uint32_t low = 0xFFFFFFFFu, high = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t key = static_cast<std::uint32_t>(words[i] >> 32);
    low = std::min(low, key);
    high = std::max(high, key);
  }
  std::int64_t first = 0;  // scratch gets the words of the deciding bin; `need` of them are in the top k
  std::int64_t need = k;
  if (scratch.size() < static_cast<std::size_t>(n)) scratch.resize(static_cast<std::size_t>(n));
  if (n <= 512 || low == high) {
    std::copy(words, words + n, scratch.begin());
    first = n;
  } else {
    // bin = (key - low) * kBins / range, by a multiplication: monotonic in the key and below kBins.
    const std::uint64_t range = static_cast<std::uint64_t>(high - low) + 1;
    const std::uint64_t scale = (static_cast<std::uint64_t>(kBins) << 32) / range;
    const auto bin_of = [&](std::uint64_t word) {
      return static_cast<int>((static_cast<std::uint64_t>(static_cast<std::uint32_t>(word >> 32) - low) * scale) >> 32);
    };
    std::uint32_t histogram[kBins] = {};
    for (std::int64_t i = 0; i < n; ++i) ++histogram[bin_of(words[i])];
    int bin = kBins - 1;
    std::int64_t above = 0;
    while (above + static_cast<std::int64_t>(histogram[bin]) < k) above += histogram[bin--];
    need = k - above;
    for (std::int64_t i = 0; i < n; ++i) {
      if (bin_of(words[i]) == bin) scratch[static_cast<std::size_t>(first++)] = words[i];
    }
  }
  std::nth_element(scratch.begin(), scratch.begin() + (need - 1), scratch.begin() + first, std::greater<std::uint64_t>());
  return scratch[static_cast<std::size_t>(need - 1)];
}

/// Sorts distinct words in descending order: LSD radix sort on 8-bit digits, skipping the digits all words
/// share (the high bits of the positions, usually); std::sort for short lists.
void sort_descending(std::uint64_t* words, std::int64_t n, std::vector<std::uint64_t>& scratch) {
  if (n < 256) {
    std::sort(words, words + n, std::greater<std::uint64_t>());
    return;
  }
  if (scratch.size() < static_cast<std::size_t>(n)) scratch.resize(static_cast<std::size_t>(n));
  std::uint64_t* from = words;
  std::uint64_t* to = scratch.data();
  for (int shift = 0; shift < 64; shift += 8) {
    std::int64_t count[257] = {};
    for (std::int64_t i = 0; i < n; ++i) ++count[1 + (((~from[i]) >> shift) & 0xFF)];
    if (count[1 + (((~from[0]) >> shift) & 0xFF)] == n) continue;  // every word has this digit
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (std::int64_t i = 0; i < n; ++i) to[count[((~from[i]) >> shift) & 0xFF]++] = from[i];
    std::swap(from, to);
  }
  if (from != words) std::copy(from, from + n, words);
}

/// A threshold from a sample of a row's n scores (kSampleRuns runs of consecutive scores spread over the row: few
/// cache lines), set a little low so that about `fill` scores or more pass it; -infinity (every non-NaN score
/// passes) for short rows, large fills, or too few valid samples. Callers check the count that passed.
template <typename T>
T sampled_threshold(const T* row, std::int64_t n, std::int64_t fill, std::vector<T>& sample) {
  constexpr std::int64_t kSample = 2048;
  if (n < 4 * kSample || fill * 4 >= n) return -std::numeric_limits<T>::infinity();
  sample.clear();
  for (std::int64_t c = 0; c < kSampleRuns; ++c) {
    const T* run = row + (c * n) / kSampleRuns;
    for (std::int64_t i = 0; i < kSample / kSampleRuns; ++i) {
      if (run[i] == run[i]) sample.push_back(run[i]);
    }
  }
  const std::int64_t valid = static_cast<std::int64_t>(sample.size());
  const double expected = static_cast<double>(fill) * static_cast<double>(valid) / static_cast<double>(n);
  const std::int64_t rank = static_cast<std::int64_t>(expected + 4.0 * std::sqrt(expected) + 16.0);
  if (rank >= valid) return -std::numeric_limits<T>::infinity();
  std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<T>());
  return sample[static_cast<std::size_t>(rank)];
}

/// Scores [first, first + n) of a row: the positions, in ascending order, of the best `fill` non-NaN scores
/// (all of them when fewer), written to out; returns how many. `words` and `scratch` are reused buffers.
std::int64_t choose_by_score(const float* scores, std::int64_t first, std::int64_t n, std::int64_t fill,
                             std::int32_t* out, std::vector<std::uint64_t>& words, std::vector<std::uint64_t>& scratch,
                             std::vector<float>& sample) {
  if (fill <= 0 || n <= 0) return 0;
  const topk_kernels::FilterFn filter = topk_kernels::filter_for(simd_level());
  if (static_cast<std::int64_t>(words.size()) < n + topk_kernels::kFilterSlack) {
    words.resize(static_cast<std::size_t>(n + topk_kernels::kFilterSlack));
  }

  // Replaced by -inf below (every non-NaN score passes) when too few scores passed it.
  const float threshold = sampled_threshold(scores + first, n, fill, sample);
  std::int64_t count = filter(scores + first, n, threshold, static_cast<std::uint32_t>(first), words.data());
  if (count < fill && threshold != -kInf) {
    count = filter(scores + first, n, -kInf, static_cast<std::uint32_t>(first), words.data());
  }
  if (count <= fill) {
    for (std::int64_t i = 0; i < count; ++i) out[i] = candidate_position(words[static_cast<std::size_t>(i)]);
    return count;
  }
  // The fill-th best candidate word decides; words are unique and in ascending position order.
  const std::uint64_t last = kth_best_word(words.data(), count, fill, scratch);
  std::int64_t written = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::uint64_t word = words[static_cast<std::size_t>(i)];
    if (word >= last) out[written++] = candidate_position(word);
  }
  return written;
}

/// Writes a selection row from the chosen positions already at out[sink_end, sink_end + chosen).
void complete_row(const SelectionRowPlan& plan, std::int64_t chosen, std::int32_t* out) {
  for (std::int64_t s = 0; s < plan.sink_end; ++s) out[s] = static_cast<std::int32_t>(s);
  std::int64_t w = plan.sink_end + chosen;
  for (std::int64_t s = plan.local_begin; s < plan.allowed; ++s) out[w++] = static_cast<std::int32_t>(s);
  for (; w < plan.width; ++w) out[w] = -1;
}

/// An fp64 candidate: double scores need all 64 bits, so the position travels beside the score.
struct DoubleCandidate {
  double score;
  std::int64_t position;
};
/// Higher score first; equal scores (+0 and -0 too) prefer the lower position. NaN never gets here.
inline bool better(const DoubleCandidate& a, const DoubleCandidate& b) {
  return a.score != b.score ? a.score > b.score : a.position < b.position;
}

struct RowBuffers {
  std::vector<std::uint64_t> words;
  std::vector<std::uint64_t> scratch;
  std::vector<float> sample;
  std::vector<DoubleCandidate> candidates;
  std::vector<DoubleCandidate> candidate_scratch;
  std::vector<double> sample64;
  std::vector<float> row;
  std::vector<double> row64;
  std::vector<std::int32_t> out;
};

std::int64_t choose_by_score(const float* scores, std::int64_t first, std::int64_t n, std::int64_t fill,
                             std::int32_t* out, RowBuffers& buffers) {
  return choose_by_score(scores, first, n, fill, out, buffers.words, buffers.scratch, buffers.sample);
}

/// The fp64 version of choose_by_score: the same sampled threshold and checks, with (score, position) pairs.
std::int64_t choose_by_score(const double* scores, std::int64_t first, std::int64_t n, std::int64_t fill,
                             std::int32_t* out, RowBuffers& buffers) {
  if (fill <= 0 || n <= 0) return 0;
  const double threshold = sampled_threshold(scores + first, n, fill, buffers.sample64);
  std::vector<DoubleCandidate>& candidates = buffers.candidates;
  const auto collect = [&](double bound) {
    candidates.clear();
    for (std::int64_t i = 0; i < n; ++i) {
      const double value = scores[first + i];
      if (value >= bound) candidates.push_back({value, first + i});  // never NaN
    }
  };
  collect(threshold);
  if (static_cast<std::int64_t>(candidates.size()) < fill && threshold != -std::numeric_limits<double>::infinity()) {
    collect(-std::numeric_limits<double>::infinity());
  }
  const std::int64_t count = static_cast<std::int64_t>(candidates.size());
  if (count <= fill) {
    for (std::int64_t i = 0; i < count; ++i) out[i] = static_cast<std::int32_t>(candidates[static_cast<std::size_t>(i)].position);
    return count;
  }
  std::vector<DoubleCandidate>& scratch = buffers.candidate_scratch;
  scratch.assign(candidates.begin(), candidates.end());
  std::nth_element(scratch.begin(), scratch.begin() + (fill - 1), scratch.end(), better);
  const DoubleCandidate last = scratch[static_cast<std::size_t>(fill - 1)];
  std::int64_t written = 0;
  for (const DoubleCandidate& c : candidates) {
    if (!better(last, c)) out[written++] = static_cast<std::int32_t>(c.position);
  }
  return written;
}

/// fast_select_topk after its checks: every row of scores [T, G, N] (fp32 or fp64, any strides).
template <typename T>
void select_rows(const T* score_data, const std::int64_t score_strides[3], const std::int32_t* position_data,
                 std::int64_t position_stride, std::int64_t tokens, std::int64_t groups, std::int64_t keys,
                 const SelectionPolicy& policy, std::int32_t* out, const std::int64_t out_strides[3]) {
  const std::int64_t width = policy.width();
  // One row: no parallel region (waking threads costs more than the row on a busy machine).
#pragma omp parallel if (tokens * groups > 1)
  {
    RowBuffers buffers;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const SelectionRowPlan plan = SelectionRowPlan::make(policy, position_data[t * position_stride], keys);
        const T* row = score_data + t * score_strides[0] + g * score_strides[1];
        if (score_strides[2] != 1) {
          std::vector<T>& copy = [&]() -> std::vector<T>& {
            if constexpr (std::is_same_v<T, float>) return buffers.row; else return buffers.row64;
          }();
          copy.resize(static_cast<std::size_t>(plan.local_begin));
          for (std::int64_t s = plan.sink_end; s < plan.local_begin; ++s) {
            copy[static_cast<std::size_t>(s)] = row[s * score_strides[2]];
          }
          row = copy.data();
        }
        std::int32_t* out_row = out + t * out_strides[0] + g * out_strides[1];
        std::int32_t* target = out_row;
        if (out_strides[2] != 1) {
          buffers.out.resize(static_cast<std::size_t>(width));
          target = buffers.out.data();
        }
        const std::int64_t chosen = choose_by_score(row, plan.sink_end, plan.local_begin - plan.sink_end, plan.fill,
                                                    target + plan.sink_end, buffers);
        complete_row(plan, chosen, target);
        if (target != out_row) {
          for (std::int64_t i = 0; i < width; ++i) out_row[i * out_strides[2]] = target[i];
        }
      }
    }
  }
}

}  // namespace

// ---- scalar kernels and dispatch -----------------------------------------------------------------------

namespace topk_kernels {

std::int64_t filter_scalar(const float* scores, std::int64_t n, float threshold, std::uint32_t first_position,
                           std::uint64_t* out) {
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (scores[i] >= threshold) {
      out[count++] = make_candidate(scores[i], first_position + static_cast<std::uint32_t>(i));
    }
  }
  return count;
}

void block_scores_scalar(const float* queries, std::int64_t nq, const float* keys, std::int64_t nk,
                         std::int64_t dim, float* out, std::int64_t out_stride, float* workspace) {
  for (std::int64_t j0 = 0; j0 < nk; j0 += kKeyTile) {
    pack_key_panel(keys, nk, dim, j0, workspace);
    for (std::int64_t q = 0; q < nq; ++q) {
      float acc[kKeyTile] = {};
      const float* query = queries + q * dim;
      for (std::int64_t d = 0; d < dim; ++d) {
        const float a = query[d];
        const float* panel = workspace + d * kKeyTile;
        for (std::int64_t jj = 0; jj < kKeyTile; ++jj) acc[jj] += a * panel[jj];
      }
      std::copy(acc, acc + kKeyTile, out + q * out_stride + j0);
    }
  }
}

FilterFn filter_for(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512: return filter_avx512;
    case SimdLevel::avx2: return filter_avx2;
    case SimdLevel::scalar: break;
  }
  return filter_scalar;
}

BlockScoresFn block_scores_for(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512: return block_scores_avx512;
    case SimdLevel::avx2: return block_scores_avx2;
    case SimdLevel::scalar: break;
  }
  return block_scores_scalar;
}

}  // namespace topk_kernels

// ---- StreamingTopK -------------------------------------------------------------------------------------

StreamingTopK::StreamingTopK(std::int64_t k) { reset(k); }

void StreamingTopK::reset(std::int64_t k) {
  KEYSEL_CHECK_ARG(k >= 0 && k < kMaxK, "k", "0 <= k < 2^31", k);
  k_ = k;
  count_ = 0;
  threshold_ = k == 0 ? kInf : -kInf;
  capacity_ = std::max<std::int64_t>(2 * k, k + kChunk);
}

void StreamingTopK::reserve_buffer() {
  const std::size_t needed = static_cast<std::size_t>(capacity_ + kChunk + topk_kernels::kFilterSlack);
  if (candidates_.size() < needed) candidates_.resize(needed);
}

void StreamingTopK::compact() {
  if (count_ > k_) {
    const std::uint64_t last = kth_best_word(candidates_.data(), count_, k_, scratch_);
    std::int64_t kept = 0;
    for (std::int64_t i = 0; i < count_; ++i) {
      const std::uint64_t word = candidates_[static_cast<std::size_t>(i)];
      candidates_[static_cast<std::size_t>(kept)] = word;
      kept += word >= last;
    }
    count_ = k_;
    threshold_ = candidate_score(last);
  } else if (count_ == k_ && k_ > 0) {
    threshold_ = candidate_score(*std::min_element(candidates_.begin(), candidates_.begin() + count_));
  }
}

void StreamingTopK::push(const float* scores, std::int64_t first_position, std::int64_t count) {
  if (k_ == 0 || count <= 0) return;
  KEYSEL_CHECK_ARG(first_position >= 0 && first_position + count <= kMaxK, "first_position",
                   "keys [first_position, first_position + count) within [0, 2^31 - 1)", first_position);
  reserve_buffer();
  const topk_kernels::FilterFn filter = topk_kernels::filter_for(simd_level());
  for (std::int64_t begin = 0; begin < count; begin += kChunk) {
    const std::int64_t n = std::min(kChunk, count - begin);
    count_ += filter(scores + begin, n, threshold_, static_cast<std::uint32_t>(first_position + begin),
                     candidates_.data() + count_);
    if (count_ >= capacity_) compact();
  }
}

void StreamingTopK::merge(const StreamingTopK& other) {
  KEYSEL_CHECK_ARG(other.k_ == k_, "other", "an accumulator with k = " + std::to_string(k_), other.k_);
  if (k_ == 0 || other.count_ == 0) return;
  reserve_buffer();
  for (std::int64_t i = 0; i < other.count_; ++i) {
    const std::uint64_t word = other.candidates_[static_cast<std::size_t>(i)];
    if (candidate_score(word) >= threshold_) {
      candidates_[static_cast<std::size_t>(count_++)] = word;
      if (count_ >= capacity_) compact();
    }
  }
}

std::int64_t StreamingTopK::size() {
  compact();
  return count_;
}

std::int64_t StreamingTopK::finish(std::int32_t* out, std::int64_t width) {
  compact();
  KEYSEL_CHECK_ARG(width >= count_, "width", ">= " + std::to_string(count_), width);
  for (std::int64_t i = 0; i < count_; ++i) out[i] = candidate_position(candidates_[static_cast<std::size_t>(i)]);
  const std::int64_t n = count_;
  std::sort(out, out + n);
  for (std::int64_t i = n; i < width; ++i) out[i] = -1;
  reset(k_);
  return n;
}

void StreamingTopK::finish_row(const SelectionRowPlan& plan, std::int32_t* out) {
  const std::int64_t local = plan.allowed - plan.local_begin;
  const std::int64_t chosen = finish(out + plan.sink_end, plan.width - plan.sink_end - local);
  complete_row(plan, chosen, out);
}

std::int64_t StreamingTopK::finish_by_score(std::int64_t* ids, float* scores) {
  compact();
  sort_descending(candidates_.data(), count_, scratch_);
  const std::int64_t n = count_;
  for (std::int64_t i = 0; i < k_; ++i) {
    const bool have = i < n;
    const std::uint64_t word = have ? candidates_[static_cast<std::size_t>(i)] : 0;
    if (ids != nullptr) ids[i] = have ? candidate_position(word) : -1;
    if (scores != nullptr) scores[i] = have ? candidate_score(word) : -kInf;
  }
  reset(k_);
  return n;
}

// ---- rows and tensors ----------------------------------------------------------------------------------

void fast_select_topk_row(const float* scores, const SelectionRowPlan& plan, std::int32_t* out) {
  thread_local RowBuffers buffers;
  const std::int64_t chosen =
      choose_by_score(scores, plan.sink_end, plan.local_begin - plan.sink_end, plan.fill, out + plan.sink_end,
                      buffers.words, buffers.scratch, buffers.sample);
  complete_row(plan, chosen, out);
}

void fast_select_topk(const TensorView& scores, const TensorView& positions, const SelectionPolicy& policy,
                      const TensorView& selection) {
  detail::check_topk_arguments("fast_select_topk", scores, positions, policy, selection);
  (void)simd_level();  // a bad KEYSEL_SIMD throws here, before the parallel rows call it
  const std::int64_t tokens = scores.size(0);
  const std::int64_t groups = scores.size(1);
  const std::int64_t keys = scores.size(2);
  const std::int32_t* position_data = positions.data<std::int32_t>();
  const std::int64_t position_stride = positions.stride(0);
  KEYSEL_CHECK_ARG_IN("fast_select_topk", keys < kMaxK, "scores", "at most 2^31 - 2 keys (int32 positions)",
                      scores.str());

  const std::int64_t score_strides[3] = {scores.stride(0), scores.stride(1), scores.stride(2)};
  const std::int64_t out_strides[3] = {selection.stride(0), selection.stride(1), selection.stride(2)};
  std::int32_t* out = selection.mutable_data<std::int32_t>();
  if (scores.dtype() == DType::fp64) {
    select_rows(scores.data<double>(), score_strides, position_data, position_stride, tokens, groups, keys, policy,
                out, out_strides);
  } else {
    select_rows(scores.data<float>(), score_strides, position_data, position_stride, tokens, groups, keys, policy,
                out, out_strides);
  }
}

}  // namespace keysel
