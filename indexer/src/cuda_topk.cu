// Radix-select top-k, one thread block per row (see keysel/indexer/cuda_topk.h for the contract).
//
// Scores map to 32-bit keys whose unsigned order is the float order (NaN -> 0, never selected; -0 -> +0). A row
// is selected in at most five passes over its scores, all but the first served from L2:
//   A  histogram of an 11-bit coarse key (the top bits of the fp16-rounded score, monotone in the score and
//      spread finer than the float's own top bits) -> the bucket b0 that holds the fill-th largest key;
//   B  the full keys of bucket b0 go to shared memory (or, beyond its capacity, rounds B' re-read the row);
//   -  three radix rounds (11, 11, 10 bits) over those keys give the threshold key T and r, the number of keys
//      equal to T that are taken;
//   C  an ordered compaction: a block-wide scan of (taken-above-T, equal-to-T) flags in position order writes
//      the kept keys, every key above T and the first r keys equal to T (lowest positions first) in ascending
//      position order, then -1 padding. No sort is needed and ties resolve exactly as select_topk does.
#include <cub/block/block_scan.cuh>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>

#include "cuda_indexer_launch.h"
#include "cuda_topk_sizes.h"
#include "cuda_pdl.cuh"
#include "keysel/core/row_plan.h"
#include "mtp_rows.h"

namespace keysel::cuda_kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kItems = 8;  // contiguous scores per thread per chunk
constexpr int kChunk = kThreads * kItems;
constexpr int kBins = kTopkBins;
constexpr int kBufferCapacity = 6144;

__device__ __forceinline__ std::uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  if (x == 0.0f) x = 0.0f;  // -0 == +0
  const std::uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// 11-bit coarse bucket of a non-NaN score: monotone non-decreasing in the score.
__device__ __forceinline__ std::uint32_t coarse_bucket(float x) {
  if (x == 0.0f) x = 0.0f;
  const std::uint32_t h = __half_as_ushort(__float2half_rn(x));
  const std::uint32_t key = (h & 0x8000u) ? (~h & 0xFFFFu) : (h | 0x8000u);
  return key >> 5;
}

/// Loads the kItems scores at positions first..first+kItems-1 (NaN beyond the row's end).
__device__ __forceinline__ void load_items(const float* row, int n, int first, bool vector_ok, float (&v)[kItems]) {
  if (vector_ok && first + kItems <= n) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(row + first));
    const float4 b = __ldg(reinterpret_cast<const float4*>(row + first + 4));
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = first + i < n ? __ldg(row + first + i) : __int_as_float(0x7fffffff);
  }
}

/// Writes one chunk of a row's selection in position order. Each thread holds kItems consecutive positions from
/// p0, with take_bits (a kept key, or a score above the threshold) and tie_bits (a score equal to it); a block-wide
/// scan places every taken position after the `taken_before` taken so far and the first `ties` tied positions
/// (in position order) among them. Updates taken_before and ties_before for the next chunk; ends with a barrier,
/// as the scan storage is reused by the next chunk.
template <typename IntScan>
__device__ __forceinline__ void write_chunk(typename IntScan::TempStorage& scan_storage, unsigned take_bits,
                                            unsigned tie_bits, int p0, int ties, int& taken_before,
                                            int& ties_before, std::int32_t* out) {
  const int packed = __popc(take_bits) | (__popc(tie_bits) << 16);
  int prefix = 0, aggregate = 0;
  IntScan(scan_storage).ExclusiveSum(packed, prefix, aggregate);
  if ((take_bits | tie_bits) != 0u) {
    int taken = taken_before + (prefix & 0xffff);
    int tie_rank = ties_before + (prefix >> 16);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool take = (take_bits >> i) & 1u;
      const bool tie = (tie_bits >> i) & 1u;
      if (take || (tie && tie_rank < ties)) out[taken + (tie_rank < ties ? tie_rank : ties)] = p0 + i;
      taken += take;
      tie_rank += tie;
    }
  }
  taken_before += aggregate & 0xffff;
  ties_before += aggregate >> 16;
  __syncthreads();
}

struct FindResult {
  int bin;
  int remaining;  // how many keys of `bin` are still to take
};

/// Finds the bin holding the `want`-th largest key (want >= 1) of hist[0..bins), scanning from the top bin;
/// bin -1 when the histogram holds fewer than `want` keys.
template <typename Scan>
__device__ FindResult find_bin(const int* hist, int bins, int want, typename Scan::TempStorage& scan_storage,
                               FindResult& shared_result) {
  const int tid = threadIdx.x;
  const int bin0 = bins - 1 - 2 * tid;  // this thread's bins, in descending order: bin0, bin0 - 1
  const int h0 = bin0 >= 0 ? hist[bin0] : 0;
  const int h1 = bin0 - 1 >= 0 ? hist[bin0 - 1] : 0;
  int above = 0, total = 0;
  if (tid == 0) shared_result = {-1, 0};
  Scan(scan_storage).ExclusiveSum(h0 + h1, above, total);  // its barrier orders the write above
  if (bin0 >= 0 && above < want && want <= above + h0) shared_result = {bin0, want - above};
  if (bin0 - 1 >= 0 && above + h0 < want && want <= above + h0 + h1) shared_result = {bin0 - 1, want - above - h0};
  __syncthreads();
  return shared_result;
}

/// Visits the candidates [first, last) of a row chunk by chunk: f(v, first_position, full) where `full` says the
/// chunk's kItems positions of this thread all lie inside [first, last) (no per-item range checks needed).
template <int Threads = kThreads, typename F>
__device__ __forceinline__ void for_each_chunk(const float* row, int n, int first, int last, bool vector_ok, F&& f) {
  constexpr int chunk = Threads * kItems;
  const int tid = threadIdx.x;
  for (int base = first / chunk * chunk; base < last; base += chunk) {
    float v[kItems];
    const int p0 = base + tid * kItems;
    load_items(row, n, p0, vector_ok, v);
    f(v, p0, p0 >= first && p0 + kItems <= last);
  }
}

/// Where a row's scores lie and which of them it may select: row r's scores start at scores + r * stride +
/// start (start = starts[r], or 0), and positions count from there (the selection's indices too). Its last allowed
/// position is, relative to start: ends[r] - 1 - start (ranged rows); else lengths[r] - 1 (lengths_per_row) or
/// lengths[r / next_n] - next_n + r % next_n (next_n query tokens per sequence, the last one reading all its
/// keys); else positions[r / groups] - start. Rows hold n - start scores.
struct RowSource {
  const float* scores;
  std::int64_t stride;
  const std::int32_t* positions;  // [rows / groups], or nullptr
  const std::int32_t* starts;     // [rows] or nullptr
  const std::int32_t* ends;       // [rows] or nullptr
  const std::int32_t* lengths;    // [rows / next_n] or [rows], or nullptr
  int groups, next_n, n;
  bool lengths_per_row, vector_ok;  // vector_ok: stride and scores allow 16-byte loads at start % 4 == 0
};

struct RowSpan {
  const float* base;  // position 0 of the row
  int n;              // scores from base on
  int last;           // last allowed position (-1: none; the plan clamps it to n - 1)
  bool vector_ok;
};

__device__ __forceinline__ RowSpan row_span(const RowSource& s, std::int64_t row) {
  int start = s.starts ? s.starts[row] : 0;
  start = start < 0 ? 0 : (start > s.n ? s.n : start);
  std::int64_t last;
  if (s.ends) {
    last = static_cast<std::int64_t>(s.ends[row]) - 1 - start;
  } else if (s.lengths) {
    last = s.lengths_per_row ? static_cast<std::int64_t>(s.lengths[row]) - 1
                             : detail::mtp_row_keys(s.lengths[row / s.next_n], s.next_n, row % s.next_n) - 1;
  } else {
    last = static_cast<std::int64_t>(s.positions[row / s.groups]) - start;
  }
  RowSpan span;
  span.base = s.scores + row * s.stride + start;
  span.n = s.n - start;
  span.last = last < -1 ? -1 : (last > 0x7ffffffe ? 0x7ffffffe : static_cast<int>(last));
  span.vector_ok = s.vector_ok && start % 4 == 0;
  return span;
}

__global__ void __launch_bounds__(kThreads) topk_rows_kernel(const RowSource source, int k, int n_sink, int n_local,
                                                             bool kept_on_top, int width,
                                                             std::int32_t* __restrict__ selection) {
  using IntScan = cub::BlockScan<int, kThreads>;
  __shared__ int hist[kBins];
  __shared__ std::uint32_t buffer[kBufferCapacity];
  __shared__ typename IntScan::TempStorage scan_storage;
  __shared__ FindResult found;
  __shared__ int buffer_count;

  const int tid = threadIdx.x;
  const std::int64_t row_index = blockIdx.x;
  const RowSpan span = row_span(source, row_index);
  const float* row = span.base;
  const int n = span.n;
  const bool vector_ok = span.vector_ok;
  std::int32_t* out = selection + row_index * width;
  const BasicRowPlan<int> plan = BasicRowPlan<int>::make(k, n_sink, n_local, kept_on_top, width, span.last, n);
  const int allowed = plan.allowed, sink_end = plan.sink_end, local_begin = plan.local_begin, fill = plan.fill;

  for (int i = tid; i < kBins; i += kThreads) hist[i] = 0;
  if (tid == 0) buffer_count = 0;
  __syncthreads();

  // Pass A: coarse histogram of the candidates [sink_end, local_begin).
  if (fill > 0) {
    for_each_chunk(row, n, sink_end, local_begin, vector_ok, [&](const float (&v)[kItems], int p0, bool full) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool in_range = full || (p0 + i >= sink_end && p0 + i < local_begin);
        if (in_range && !isnan(v[i])) atomicAdd(&hist[coarse_bucket(v[i])], 1);
      }
    });
  }
  __syncthreads();

  std::uint32_t threshold = 0;  // keys above it are taken; 0 with `ties` 0 takes every valid key
  int ties = 0;                 // keys equal to `threshold` taken, lowest positions first
  if (fill <= 0) {
    threshold = 0xFFFFFFFFu;
  } else {
    const FindResult coarse = find_bin<IntScan>(hist, kBins, fill, scan_storage, found);
    if (coarse.bin >= 0) {
      const std::uint32_t b0 = static_cast<std::uint32_t>(coarse.bin);
      const int in_bucket = hist[b0];
      // Pass B: the bucket's full keys into shared memory (warp-aggregated appends).
      const bool buffered = in_bucket <= kBufferCapacity;
      if (buffered) {
        for_each_chunk(row, n, sink_end, local_begin, vector_ok, [&](const float (&v)[kItems], int p0, bool full) {
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            const bool in_range = full || (p0 + i >= sink_end && p0 + i < local_begin);
            const bool match = in_range && !isnan(v[i]) && coarse_bucket(v[i]) == b0;
            const unsigned mask = __ballot_sync(0xffffffffu, match);
            if (mask != 0u) {
              const int lane = tid & 31;
              const int leader = __ffs(mask) - 1;
              int slot = 0;
              if (lane == leader) slot = atomicAdd(&buffer_count, __popc(mask));
              slot = __shfl_sync(0xffffffffu, slot, leader);
              if (match) buffer[slot + __popc(mask & ((1u << lane) - 1u))] = order_key(v[i]);
            }
          }
        });
      }
      // Three radix rounds over the bucket's keys: bits 31..21, 20..10, 9..0.
      int remaining = coarse.remaining;
      std::uint32_t prefix = 0;
#pragma unroll
      for (int round = 0; round < 3; ++round) {
        const int shift = round == 0 ? 21 : (round == 1 ? 10 : 0);
        const int bits = round == 2 ? 10 : 11;
        const std::uint32_t digit_mask = (1u << bits) - 1u;
        const int high = shift + bits;  // bits at and above `high` must equal `prefix`
        __syncthreads();
        for (int i = tid; i < kBins; i += kThreads) hist[i] = 0;
        __syncthreads();
        const auto count = [&](std::uint32_t key) {
          if (high >= 32 || (key >> high) == prefix) atomicAdd(&hist[(key >> shift) & digit_mask], 1);
        };
        if (buffered) {
          for (int i = tid; i < in_bucket; i += kThreads) count(buffer[i]);
        } else {
          for_each_chunk(row, n, sink_end, local_begin, vector_ok, [&](const float (&v)[kItems], int p0, bool full) {
#pragma unroll
            for (int i = 0; i < kItems; ++i) {
              const bool in_range = full || (p0 + i >= sink_end && p0 + i < local_begin);
              if (in_range && !isnan(v[i]) && coarse_bucket(v[i]) == b0) count(order_key(v[i]));
            }
          });
        }
        __syncthreads();
        const FindResult digit = find_bin<IntScan>(hist, static_cast<int>(digit_mask) + 1, remaining, scan_storage, found);
        prefix = (prefix << bits) | static_cast<std::uint32_t>(digit.bin < 0 ? 0 : digit.bin);
        remaining = digit.remaining;
      }
      threshold = prefix;
      ties = remaining;
    }
    // coarse.bin < 0: fewer valid candidates than fill, all are taken (threshold 0).
  }
  __syncthreads();

  // Pass C: ordered compaction over [0, allowed). Per chunk, one block scan of packed 16-bit counts
  // (taken in the low half, equal-to-threshold in the high half; a chunk holds at most 8192 of each).
  int taken_before = 0;  // keys written so far, ties excluded
  int ties_before = 0;   // keys equal to the threshold seen so far
  for (int base = 0; base < allowed; base += kChunk) {
    const int p0 = base + tid * kItems;
    const bool any_candidate = p0 < local_begin && p0 + kItems > sink_end;
    float v[kItems];
    if (any_candidate) load_items(row, n, p0, vector_ok, v);
    unsigned take_bits = 0, tie_bits = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int p = p0 + i;
      bool take = p < sink_end || (p >= local_begin && p < allowed);
      bool tie = false;
      if (any_candidate && !take && p < allowed) {
        const std::uint32_t key = order_key(v[i]);
        take = key > threshold;
        tie = ties > 0 && key == threshold;
      }
      take_bits |= static_cast<unsigned>(take) << i;
      tie_bits |= static_cast<unsigned>(tie) << i;
    }
    write_chunk<IntScan>(scan_storage, take_bits, tie_bits, p0, ties, taken_before, ties_before, out);
  }
  const int written = taken_before + (ties_before < ties ? ties_before : ties);
  for (int i = written + tid; i < width; i += kThreads) out[i] = -1;
}

// ---- several thread blocks per row (few rows, long rows) ---------------------------------------------------
//
// The same selection split over segments of a row: K1 coarse histograms of the segments add into one histogram
// per row; K2 finds the threshold bucket (every block, redundantly), counts its segment's keys above it and
// copies the bucket's keys to scratch; K3 (one block per row) radix-refines the bucket's keys to the threshold
// key, turns per-segment counts into output offsets and writes the -1 padding; K4 compacts each segment in
// position order at its offset.

constexpr int kSegThreads = 256;
constexpr int kSegChunk = kSegThreads * kItems;  // 2048

struct SegmentParams {
  RowSource src;                  // the rows (at most n scores each)
  std::int32_t* selection;        // [rows, width]
  int* hist;                      // [rows, kBins], zeroed
  int* row_info;                  // [rows, 4]: threshold bucket, remaining, threshold key, ties
  int* seg_info;                  // [rows, segments, 4]: above-bucket count, bucket count, take offset, tie offset
  std::uint32_t* bucket_keys;     // [rows, n]: segment s's bucket keys from row * n + s * seg_len
  int n, k, n_sink, n_local, width, segments, seg_len;
  bool kept_on_top;
};

/// The plan of row `row` (SPEC §2) over its span.
__device__ __forceinline__ BasicRowPlan<int> row_plan(const SegmentParams& p, const RowSpan& span) {
  return BasicRowPlan<int>::make(p.k, p.n_sink, p.n_local, p.kept_on_top, p.width, span.last, span.n);
}

/// Zeroes the per-row histograms (the first kernel of the chain, launched in plain stream order).
__global__ void __launch_bounds__(kSegThreads) segment_zero_kernel(int* __restrict__ hist, int count) {
  pdl_trigger();
  for (int i = blockIdx.x * kSegThreads + threadIdx.x; i < count; i += gridDim.x * kSegThreads) hist[i] = 0;
}

__global__ void __launch_bounds__(kSegThreads) segment_histogram_kernel(const SegmentParams p) {
  __shared__ int hist[kBins];
  pdl_trigger();
  const int row = blockIdx.y, seg = blockIdx.x, tid = threadIdx.x;
  const RowSpan span = row_span(p.src, row);
  const BasicRowPlan<int> g = row_plan(p, span);
  const int first = max(g.sink_end, seg * p.seg_len), last = min(g.local_begin, (seg + 1) * p.seg_len);
  const bool work = g.fill > 0 && first < last;
  // The segment's histogram in shared memory reads only the inputs (complete before the chain's first kernel
  // started), so it overlaps the zeroing; the global histogram is touched after pdl_wait().
  if (work) {
    for (int i = tid; i < kBins; i += kSegThreads) hist[i] = 0;
    __syncthreads();
    for_each_chunk<kSegThreads>(span.base, span.n, first, last, span.vector_ok, [&](const float (&v)[kItems], int p0, bool full) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool in_range = full || (p0 + i >= first && p0 + i < last);
        if (in_range && !isnan(v[i])) atomicAdd(&hist[coarse_bucket(v[i])], 1);
      }
    });
    __syncthreads();
  }
  pdl_wait();
  if (!work) return;
  int* out = p.hist + static_cast<std::int64_t>(row) * kBins;
  for (int i = tid; i < kBins; i += kSegThreads) {
    if (hist[i] != 0) atomicAdd(out + i, hist[i]);
  }
}

/// Threshold bucket of a row from its histogram: {bucket, remaining}; bucket -1 takes every valid key,
/// kBins takes none.
__device__ FindResult row_bucket(const int* hist, int fill) {
  using Scan = cub::BlockScan<int, kSegThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ FindResult result;
  if (fill <= 0) return {kBins, 0};
  constexpr int kPer = kBins / kSegThreads;  // 8 bins per thread, descending
  const int tid = threadIdx.x;
  int h[kPer], sum = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    h[i] = hist[kBins - 1 - (tid * kPer + i)];
    sum += h[i];
  }
  if (tid == 0) result = {-1, 0};
  int above = 0;
  Scan(storage).ExclusiveSum(sum, above);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (above < fill && fill <= above + h[i]) result = {kBins - 1 - (tid * kPer + i), fill - above};
    above += h[i];
  }
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kSegThreads) segment_bucket_kernel(const SegmentParams p) {
  __shared__ int above_count, bucket_count;
  pdl_trigger();
  pdl_wait();
  const int row = blockIdx.y, seg = blockIdx.x, tid = threadIdx.x;
  const RowSpan span = row_span(p.src, row);
  const BasicRowPlan<int> g = row_plan(p, span);
  const FindResult bucket = row_bucket(p.hist + static_cast<std::int64_t>(row) * kBins, g.fill);
  if (tid == 0) above_count = 0, bucket_count = 0;
  __syncthreads();
  const int first = max(g.sink_end, seg * p.seg_len), last = min(g.local_begin, (seg + 1) * p.seg_len);
  const int b0 = bucket.bin;
  std::uint32_t* keys = p.bucket_keys + static_cast<std::int64_t>(row) * p.n + static_cast<std::int64_t>(seg) * p.seg_len;
  const int lane = tid & 31;
  if (first < last && b0 < kBins) {
    for_each_chunk<kSegThreads>(span.base, span.n, first, last, span.vector_ok, [&](const float (&v)[kItems], int p0, bool full) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool valid = (full || (p0 + i >= first && p0 + i < last)) && !isnan(v[i]);
        const int c = valid ? static_cast<int>(coarse_bucket(v[i])) : -2;
        const unsigned above = __ballot_sync(0xffffffffu, valid && c > b0);
        const unsigned match = __ballot_sync(0xffffffffu, valid && c == b0);
        if (lane == 0 && above != 0u) atomicAdd(&above_count, __popc(above));
        if (match != 0u) {
          const int leader = __ffs(match) - 1;
          int slot = 0;
          if (lane == leader) slot = atomicAdd(&bucket_count, __popc(match));
          slot = __shfl_sync(0xffffffffu, slot, leader);
          if ((match >> lane) & 1u) keys[slot + __popc(match & ((1u << lane) - 1u))] = order_key(v[i]);
        }
      }
    });
  }
  __syncthreads();
  if (tid == 0) {
    int* info = p.seg_info + (static_cast<std::int64_t>(row) * p.segments + seg) * 4;
    info[0] = above_count;
    info[1] = bucket_count;
    if (seg == 0) {
      int* r = p.row_info + static_cast<std::int64_t>(row) * 4;
      r[0] = bucket.bin;
      r[1] = bucket.remaining;
    }
  }
}

constexpr int kMaxSegments = kTopkMaxSegments;
constexpr int kStagedKeys = 32768;  // bucket keys of a row refined in (dynamic) shared memory: 128 KiB

__global__ void __launch_bounds__(kThreads) segment_threshold_kernel(const SegmentParams p) {
  using IntScan = cub::BlockScan<int, kThreads>;
  __shared__ int hist[kBins];
  __shared__ int seg_take[kMaxSegments], seg_tie[kMaxSegments], seg_offset[kMaxSegments];
  __shared__ int seg_count[kMaxSegments], seg_above[kMaxSegments];
  __shared__ std::uint32_t key_or, key_and;
  extern __shared__ std::uint32_t staged[];  // kStagedKeys
  __shared__ typename IntScan::TempStorage scan_storage;
  __shared__ FindResult found;
  pdl_trigger();
  pdl_wait();
  const int row = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const RowSpan span = row_span(p.src, row);
  const BasicRowPlan<int> g = row_plan(p, span);
  const int* info = p.seg_info + static_cast<std::int64_t>(row) * p.segments * 4;
  const int b0 = p.row_info[row * 4], want = p.row_info[row * 4 + 1];
  const std::uint32_t* keys = p.bucket_keys + static_cast<std::int64_t>(row) * p.n;
  // The segments' counts, read once (one global round trip) into shared memory.
  const int count = tid < p.segments ? info[tid * 4 + 1] : 0;
  if (tid < p.segments) {
    seg_count[tid] = count;
    seg_above[tid] = info[tid * 4];
  }
  if (tid == 0) key_or = 0u, key_and = 0xFFFFFFFFu;
  int offset = 0, bucket_total = 0;
  IntScan(scan_storage).ExclusiveSum(count, offset, bucket_total);
  if (tid < p.segments) seg_offset[tid] = offset;
  __syncthreads();
  // The bucket keys of all segments, gathered into shared memory when they fit: every thread loads up to four
  // keys at once (independent loads in flight; the segment of entry i is the last one whose offset is <= i), and
  // the bits on which all of them agree are noted, so that radix rounds over constant bits can be skipped.
  const bool staged_ok = bucket_total <= kStagedKeys;
  if (staged_ok) {
    std::uint32_t any = 0u, all = 0xFFFFFFFFu;
    for (int i0 = 0; i0 < bucket_total; i0 += 4 * kThreads) {
      std::uint32_t v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kThreads + tid;
        v[u] = 0u;
        if (i < bucket_total) {
          int lo = 0, hi = p.segments - 1;
          while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (seg_offset[mid] <= i) lo = mid;
            else hi = mid - 1;
          }
          v[u] = keys[static_cast<std::int64_t>(lo) * p.seg_len + (i - seg_offset[lo])];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kThreads + tid;
        if (i < bucket_total) {
          staged[i] = v[u];
          any |= v[u];
          all &= v[u];
        }
      }
    }
    any = __reduce_or_sync(0xffffffffu, any);
    all = __reduce_and_sync(0xffffffffu, all);
    if (lane == 0) {
      atomicOr(&key_or, any);
      atomicAnd(&key_and, all);
    }
  }
  __syncthreads();
  // Bits on which the bucket's keys differ (all ones when they were not staged: no round is skipped).
  const std::uint32_t differing = staged_ok ? (key_or ^ key_and) : 0xFFFFFFFFu;
  // Visits every bucket key (in any order).
  const auto for_each_key = [&](auto&& f) {
    if (staged_ok) {
      for (int i = tid; i < bucket_total; i += kThreads) f(staged[i]);
    } else {
      for (int s = 0; s < p.segments; ++s) {
        const int c = seg_count[s];
        for (int i = tid; i < c; i += kThreads) f(keys[static_cast<std::int64_t>(s) * p.seg_len + i]);
      }
    }
  };
  std::uint32_t threshold = 0xFFFFFFFFu;  // fill <= 0: nothing taken
  int ties = 0;
  if (b0 < 0) {
    threshold = 0;  // every valid key
  } else if (b0 < kBins) {
    int remaining = want;
    std::uint32_t prefix = 0;
#pragma unroll
    for (int round = 0; round < 3; ++round) {
      const int shift = round == 0 ? 21 : (round == 1 ? 10 : 0);
      const int bits = round == 2 ? 10 : 11;
      const std::uint32_t digit_mask = (1u << bits) - 1u;
      const int high = shift + bits;
      if ((differing >> shift) == 0u) {
        // Every bucket key has the same bits from `shift` up: the histogram would hold one bin with all of them
        // (at least `remaining`), so the digit is theirs and `remaining` is unchanged.
        prefix = (prefix << bits) | ((key_and >> shift) & digit_mask);
        continue;
      }
      __syncthreads();
      for (int i = tid; i < kBins; i += kThreads) hist[i] = 0;
      __syncthreads();
      for_each_key([&](std::uint32_t key) {
        if (high >= 32 || (key >> high) == prefix) atomicAdd(&hist[(key >> shift) & digit_mask], 1);
      });
      __syncthreads();
      const FindResult digit = find_bin<IntScan>(hist, static_cast<int>(digit_mask) + 1, remaining, scan_storage, found);
      prefix = (prefix << bits) | static_cast<std::uint32_t>(digit.bin < 0 ? 0 : digit.bin);
      remaining = digit.remaining;
    }
    threshold = prefix;
    ties = remaining;
  }
  // Per segment: keys taken (kept keys, keys of buckets above, bucket keys above the threshold) and ties.
  for (int s = tid; s < p.segments; s += kThreads) {
    const int lo = s * p.seg_len, hi = min(g.allowed, (s + 1) * p.seg_len);
    int kept = 0;
    if (lo < hi) {
      kept += max(0, min(hi, g.sink_end) - lo);
      kept += max(0, hi - max(lo, g.local_begin));
    }
    seg_take[s] = kept + (b0 < kBins ? seg_above[s] : 0);
    seg_tie[s] = 0;
  }
  __syncthreads();
  if (b0 >= 0 && b0 < kBins) {  // one warp per segment
    for (int s = warp; s < p.segments; s += kThreads / 32) {
      const int c = seg_count[s];
      int above = 0, equal = 0;
      for (int i0 = 0; i0 < c; i0 += 32) {
        const int i = i0 + lane;
        const std::uint32_t key = i < c ? (staged_ok ? staged[seg_offset[s] + i] : keys[static_cast<std::int64_t>(s) * p.seg_len + i]) : 0u;
        above += __popc(__ballot_sync(0xffffffffu, i < c && key > threshold));
        equal += __popc(__ballot_sync(0xffffffffu, i < c && ties > 0 && key == threshold));
      }
      if (lane == 0) {
        seg_take[s] += above;
        seg_tie[s] += equal;
      }
    }
  }
  __syncthreads();
  // Exclusive prefix over segments (two per thread), packed as take | tie << 32 in 64 bits.
  using PairScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename PairScan::TempStorage pair_storage;
  int* seg_out = p.seg_info + static_cast<std::int64_t>(row) * p.segments * 4;
  unsigned long long local[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = tid * 2 + i;
    if (s < p.segments) local[i] = static_cast<unsigned long long>(seg_take[s]) | (static_cast<unsigned long long>(seg_tie[s]) << 32);
  }
  unsigned long long prefix_pair[2], total = 0;
  PairScan(pair_storage).ExclusiveSum(local, prefix_pair, total);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = tid * 2 + i;
    if (s < p.segments) {
      seg_out[s * 4 + 2] = static_cast<int>(prefix_pair[i] & 0xffffffffull);
      seg_out[s * 4 + 3] = static_cast<int>(prefix_pair[i] >> 32);
    }
  }
  if (tid == 0) {
    p.row_info[row * 4 + 2] = static_cast<int>(threshold);
    p.row_info[row * 4 + 3] = ties;
  }
  const int total_take = static_cast<int>(total & 0xffffffffull), total_ties = static_cast<int>(total >> 32);
  const int written = total_take + (total_ties < ties ? total_ties : ties);
  std::int32_t* out = p.selection + static_cast<std::int64_t>(row) * p.width;
  for (int i = written + tid; i < p.width; i += kThreads) out[i] = -1;
}

__global__ void __launch_bounds__(kSegThreads) segment_compact_kernel(const SegmentParams p) {
  using IntScan = cub::BlockScan<int, kSegThreads>;
  __shared__ typename IntScan::TempStorage scan_storage;
  pdl_trigger();
  const int row = blockIdx.y, seg = blockIdx.x, tid = threadIdx.x;
  const RowSpan span = row_span(p.src, row);
  const BasicRowPlan<int> g = row_plan(p, span);
  const int lo = seg * p.seg_len, hi = min(g.allowed, (seg + 1) * p.seg_len);
  pdl_wait();
  if (lo >= hi) return;
  const std::uint32_t threshold = static_cast<std::uint32_t>(p.row_info[row * 4 + 2]);
  const int ties = p.row_info[row * 4 + 3];
  const int* info = p.seg_info + (static_cast<std::int64_t>(row) * p.segments + seg) * 4;
  int taken_before = info[2], ties_before = info[3];
  std::int32_t* out = p.selection + static_cast<std::int64_t>(row) * p.width;
  for (int base = lo; base < hi; base += kSegChunk) {
    const int p0 = base + tid * kItems;
    const bool any_candidate = p0 < g.local_begin && p0 + kItems > g.sink_end && p0 < hi;
    float v[kItems];
    if (any_candidate) load_items(span.base, span.n, p0, span.vector_ok, v);
    unsigned take_bits = 0, tie_bits = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int q = p0 + i;
      bool take = q < hi && (q < g.sink_end || q >= g.local_begin);
      bool tie = false;
      if (any_candidate && !take && q < hi) {
        const std::uint32_t key = order_key(v[i]);
        take = key > threshold;
        tie = ties > 0 && key == threshold;
      }
      take_bits |= static_cast<unsigned>(take) << i;
      tie_bits |= static_cast<unsigned>(tie) << i;
    }
    write_chunk<IntScan>(scan_storage, take_bits, tie_bits, p0, ties, taken_before, ties_before, out);
  }
}

/// Per GPU, once: raises the threshold kernel's dynamic shared memory limit and reads whether the loaded image
/// waits (sm_90+ code), i.e. whether the chain may be launched programmatically. Cached per device (0: not yet,
/// 1: ready, 2: ready and programmatic); a race sets the same values twice.
bool chain_waits(std::string_view function, int device) {
  static std::atomic<int> state[64];
  const bool cached = device >= 0 && device < 64;
  const int known = cached ? state[device].load(std::memory_order_acquire) : 0;
  if (known != 0) return known == 2;
  constexpr int staged_bytes = kStagedKeys * static_cast<int>(sizeof(std::uint32_t));
  cuda_glue::check(
      cudaFuncSetAttribute(segment_threshold_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, staged_bytes),
      function, "cudaFuncSetAttribute");
  const bool programmatic = image_waits(segment_histogram_kernel);
  if (cached) state[device].store(programmatic ? 2 : 1, std::memory_order_release);
  return programmatic;
}

int clamp_int(std::int64_t value) { return value > 0x7fffffff ? 0x7fffffff : static_cast<int>(value); }

}  // namespace

void launch_topk(std::string_view function, const TopkLaunch& in, void* stream) {
  const std::int64_t width = in.policy.width();
  if (in.rows == 0 || width == 0) return;
  const int multiprocessors = in.facts.multiprocessors;
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const std::int64_t stride = in.stride > 0 ? in.stride : in.n;
  RowSource source{};
  source.scores = in.scores;
  source.stride = stride;
  source.positions = in.positions;
  source.starts = in.starts;
  source.ends = in.ends;
  source.lengths = in.lengths;
  source.groups = static_cast<int>(in.groups > 0 ? in.groups : 1);
  source.next_n = in.next_n > 0 ? in.next_n : 1;
  source.n = static_cast<int>(in.n);
  source.lengths_per_row = in.lengths_per_row;
  source.vector_ok = stride % 4 == 0 && reinterpret_cast<std::uintptr_t>(in.scores) % 16 == 0;
  // Few long rows: several blocks per row, about four per SM in all; otherwise one block per row.
  const std::int64_t target_blocks = 4LL * (multiprocessors > 0 ? multiprocessors : 132);
  const bool segmented = in.force_path == 2 || (in.force_path == 0 && in.rows < multiprocessors && in.n >= 16384);
  if (!segmented) {
    topk_rows_kernel<<<static_cast<unsigned>(in.rows), kThreads, 0, cuda_stream>>>(
        source, clamp_int(in.policy.k), clamp_int(in.policy.n_sink), clamp_int(in.policy.n_local),
        in.policy.kept_on_top, clamp_int(width), in.selection);
    cuda_glue::check(cudaGetLastError(), function, "topk_rows_kernel launch");
    return;
  }
  std::int64_t seg_len = (in.n * in.rows + target_blocks - 1) / target_blocks;
  seg_len = (seg_len + kSegChunk - 1) / kSegChunk * kSegChunk;
  if (seg_len < kSegChunk) seg_len = kSegChunk;
  std::int64_t segments = (in.n + seg_len - 1) / seg_len;
  if (segments > kMaxSegments) {
    seg_len = (in.n + kMaxSegments - 1) / kMaxSegments;
    seg_len = (seg_len + kSegChunk - 1) / kSegChunk * kSegChunk;
    segments = (in.n + seg_len - 1) / seg_len;
  }
  if (segments < 1) segments = 1;
  const bool chain_programmatic = chain_waits(function, in.device);
  // The caller's workspace (checked against topk_scratch_bytes with kMaxSegments) or stream-ordered scratch.
  const auto bytes = static_cast<std::size_t>(topk_scratch_bytes(in.rows, in.n, segments, function));
  cuda_glue::Scratch workspace(function, bytes, in.device, stream, in.workspace);
  SegmentParams p{};
  p.src = source;
  p.selection = in.selection;
  p.hist = workspace.as<int>();
  p.row_info = p.hist + in.rows * kBins;
  p.seg_info = p.row_info + in.rows * 4;
  p.bucket_keys = reinterpret_cast<std::uint32_t*>(p.seg_info + in.rows * segments * 4);
  p.n = static_cast<int>(in.n);
  p.k = clamp_int(in.policy.k);
  p.n_sink = clamp_int(in.policy.n_sink);
  p.n_local = clamp_int(in.policy.n_local);
  p.width = clamp_int(width);
  p.segments = static_cast<int>(segments);
  p.seg_len = static_cast<int>(seg_len);
  p.kept_on_top = in.policy.kept_on_top;
  const dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>(in.rows));
  // Programmatic launch paid off where the chain's grids are small (B = 1: 64 blocks of 256 threads; per call 27.4
  // -> 21.9 us) and cost time where they fill the GPU (B = 64: 512 blocks, 76.5 -> 82.1 us): used up to one block
  // per SM.
  const bool programmatic = in.facts.programmatic && chain_programmatic &&
                            in.rows * segments <= static_cast<std::int64_t>(multiprocessors);
  const auto launched = [&](cudaError_t status, const char* name) {
    if (status == cudaSuccess) status = cudaGetLastError();
    cuda_glue::check(status, function, name);
  };
  // Five kernels; the last four are programmatic dependents of the one before (sm_90+), so that each starts,
  // and does the work that needs only the inputs, while its predecessor finishes.
  const int hist_count = static_cast<int>(in.rows * kBins);
  const unsigned zero_blocks = static_cast<unsigned>((hist_count + kSegThreads * 8 - 1) / (kSegThreads * 8));
  constexpr int staged_bytes = kStagedKeys * static_cast<int>(sizeof(std::uint32_t));
  launched(launch_kernel(segment_zero_kernel, dim3(zero_blocks), dim3(kSegThreads), 0, cuda_stream, false, p.hist,
                         hist_count),
           "segment_zero_kernel launch");
  launched(launch_kernel(segment_histogram_kernel, grid, dim3(kSegThreads), 0, cuda_stream, programmatic, p),
           "segment_histogram_kernel launch");
  launched(launch_kernel(segment_bucket_kernel, grid, dim3(kSegThreads), 0, cuda_stream, programmatic, p),
           "segment_bucket_kernel launch");
  launched(launch_kernel(segment_threshold_kernel, dim3(static_cast<unsigned>(in.rows)), dim3(kThreads), staged_bytes,
                         cuda_stream, programmatic, p),
           "segment_threshold_kernel launch");
  launched(launch_kernel(segment_compact_kernel, grid, dim3(kSegThreads), 0, cuda_stream, programmatic, p),
           "segment_compact_kernel launch");
  workspace.release();
}

}  // namespace keysel::cuda_kernels
